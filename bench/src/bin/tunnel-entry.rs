//! The tunnel benchmark's entry and load tools (bench/harness/tunnel.py).
//!
//! `listen` plays kube-apiserver's HTTP-CONNECT egress dialer for load tools that cannot speak
//! CONNECT (wrk): per accepted TCP connection it connects to the konnectivity server's UDS
//! frontend, sends `CONNECT dest HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n` exactly as
//! kube-apiserver does, waits for the `200`, then copies both ways. The same entry runs in front
//! of our server and upstream's, so their rows differ only in the tunnel.
//!
//!     tunnel-entry listen --listen 127.0.0.1:P --uds /path/hc.sock --dest 127.0.0.1:D
//!
//! The other subcommands are the harness's load, each printing one JSON line per result; they
//! reach the destination `sink` either through a CONNECT on the UDS (`--uds S --dest D`, as
//! kube-apiserver) or over plain TCP (`--tcp A`: direct, or a port rathole exposes):
//!
//! - `sink --listen A`: the destination. Per connection the first byte picks: `E` echo,
//!   `B` + u64 big-endian N: write N zero bytes (u64::MAX: forever) then close; nothing: idle.
//! - `bulk --bytes N`: one tunnel, N bytes downloaded, Gbit/s from request to last byte.
//! - `dial --count N`: N sequential tunnels; per tunnel the time to the CONNECT's 200 (TCP
//!   connect for `--tcp`) and to the echo of the first byte, percentiles.
//! - `idle --counts 1000,10000`: opens tunnels (each checked by one echoed byte) up to each
//!   count, prints a line and waits for a line on stdin before the next count and before exit.
//! - `isolation --streams 100 --stalled 1`: the streams download forever; aggregate throughput
//!   alone, then with `--stalled` more tunnels whose reader never reads.
//!
//! One thread (tokio current-thread): the harness pins it next to the load generator.

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixStream};

#[derive(Parser)]
#[command(about = "The tunnel benchmark's CONNECT entry, destination and load tools")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How the load reaches the destination.
#[derive(clap::Args, Clone)]
struct Via {
    /// The server's HTTP-CONNECT frontend socket (--uds-name); needs --dest.
    #[arg(long, conflicts_with = "tcp")]
    uds: Option<PathBuf>,
    /// The CONNECT request-target (the sink's address).
    #[arg(long, default_value = "")]
    dest: String,
    /// Plain TCP to this address instead (direct, or rathole's exposed port).
    #[arg(long)]
    tcp: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum Cmd {
    /// The CONNECT entry for wrk.
    Listen {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        uds: PathBuf,
        #[arg(long)]
        dest: String,
    },
    /// The destination: echo, bulk source, idle.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// One tunnel, --bytes downloaded.
    Bulk {
        #[command(flatten)]
        via: Via,
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
    },
    /// Sequential dials.
    Dial {
        #[command(flatten)]
        via: Via,
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
    /// Idle tunnels held open.
    Idle {
        #[command(flatten)]
        via: Via,
        /// Comma-separated totals to reach, each followed by a stdin handshake.
        #[arg(long, value_delimiter = ',')]
        counts: Vec<usize>,
        #[arg(long, default_value_t = 64)]
        parallel: usize,
    },
    /// Aggregate throughput of streaming tunnels, alone and next to stalled readers.
    Isolation {
        #[command(flatten)]
        via: Via,
        #[arg(long, default_value_t = 100)]
        streams: usize,
        #[arg(long, default_value_t = 1)]
        stalled: usize,
        /// Seconds of warm-up before each measurement (and for the stalled tunnels to fill).
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
}

/// Sends kube-apiserver's CONNECT request on `uds` and reads the response head; Ok once the
/// answer is 200. Bytes after the head (none are expected: the server adds nothing) are returned.
pub async fn connect(uds: &std::path::Path, dest: &str) -> anyhow::Result<(UnixStream, Vec<u8>)> {
    let mut s = UnixStream::connect(uds)
        .await
        .with_context(|| format!("connect {}", uds.display()))?;
    s.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("the server closed before answering CONNECT");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = head.split_off(end + 4);
            let status = String::from_utf8_lossy(&head);
            let line = status.lines().next().unwrap_or("");
            if line.split_whitespace().nth(1) != Some("200") {
                bail!("CONNECT {dest}: {line}");
            }
            return Ok((s, rest));
        }
        if head.len() > 16 << 10 {
            bail!("CONNECT response head too long");
        }
    }
}

/// A tunnel to the sink: a CONNECT over the UDS, or plain TCP.
enum Conn {
    Uds(UnixStream),
    Tcp(TcpStream),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Uds(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Uds(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Uds(s) => Pin::new(s).poll_flush(cx),
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Uds(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Via {
    /// Opens a tunnel to the sink (the CONNECT's 200 received, or the TCP connection up).
    async fn open(&self) -> anyhow::Result<Conn> {
        if let Some(uds) = &self.uds {
            if self.dest.is_empty() {
                bail!("--uds needs --dest");
            }
            let (s, rest) = connect(uds, &self.dest).await?;
            if !rest.is_empty() {
                bail!("{} bytes after the CONNECT response head", rest.len());
            }
            Ok(Conn::Uds(s))
        } else if let Some(addr) = self.tcp {
            let s = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connect {addr}"))?;
            s.set_nodelay(true)?;
            Ok(Conn::Tcp(s))
        } else {
            bail!("give --uds (with --dest) or --tcp")
        }
    }
}

/// Writes one byte in echo mode and waits for it to come back: the tunnel reaches the sink.
async fn echo_once(c: &mut Conn) -> anyhow::Result<()> {
    c.write_all(b"Ex").await?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.context("no echo")?;
    Ok(())
}

async fn request_bytes(c: &mut Conn, n: u64) -> anyhow::Result<()> {
    let mut req = [0u8; 9];
    req[0] = b'B';
    req[1..].copy_from_slice(&n.to_be_bytes());
    c.write_all(&req).await?;
    Ok(())
}

async fn listen(addr: SocketAddr, uds: PathBuf, dest: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("tunnel-entry: {addr} -> {} CONNECT {dest}", uds.display());
    loop {
        let (mut client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tunnel-entry: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (uds, dest) = (uds.clone(), dest.clone());
        tokio::spawn(async move {
            let run = async {
                let _ = client.set_nodelay(true);
                let (mut tunnel, rest) = connect(&uds, &dest).await?;
                if !rest.is_empty() {
                    client.write_all(&rest).await?;
                }
                tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut tunnel,
                    64 << 10,
                    64 << 10,
                )
                .await?;
                anyhow::Ok(())
            };
            if let Err(e) = run.await {
                eprintln!("tunnel-entry: {e:#}");
            }
        });
    }
}

async fn sink(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("tunnel-entry sink on {addr}");
    static ZEROS: [u8; 256 << 10] = [0u8; 256 << 10];
    loop {
        let (mut s, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("sink: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            match mode[0] {
                b'E' => {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
                b'B' => {
                    let mut n = [0u8; 8];
                    if s.read_exact(&mut n).await.is_err() {
                        return;
                    }
                    let mut left = u64::from_be_bytes(n);
                    while left > 0 {
                        let k = left.min(ZEROS.len() as u64) as usize;
                        if s.write_all(&ZEROS[..k]).await.is_err() {
                            return;
                        }
                        if left != u64::MAX {
                            left -= k as u64;
                        }
                    }
                    let _ = s.shutdown().await;
                }
                _ => {}
            }
        });
    }
}

async fn bulk(via: Via, bytes: u64) -> anyhow::Result<serde_json::Value> {
    let mut c = via.open().await?;
    let t0 = Instant::now();
    request_bytes(&mut c, bytes).await?;
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    while got < bytes {
        let n = c.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    if got != bytes {
        bail!("bulk: {got} of {bytes} bytes");
    }
    Ok(json!({"bytes": got, "seconds": secs, "gbit_s": got as f64 * 8.0 / secs / 1e9}))
}

fn percentiles(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    json!({"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": v[v.len() - 1],
           "mean_ms": v.iter().sum::<f64>() / v.len() as f64})
}

async fn dial(via: Via, count: usize) -> anyhow::Result<serde_json::Value> {
    let (mut open, mut rtt) = (Vec::with_capacity(count), Vec::with_capacity(count));
    let mut errors = 0usize;
    for _ in 0..count {
        let t0 = Instant::now();
        let mut c = match via.open().await {
            Ok(c) => c,
            Err(e) => {
                errors += 1;
                if errors > count / 100 + 5 {
                    bail!("dial: {errors} failures, last: {e:#}");
                }
                continue;
            }
        };
        let t1 = t0.elapsed();
        echo_once(&mut c).await?;
        let t2 = t0.elapsed();
        open.push(t1.as_secs_f64() * 1e3);
        rtt.push(t2.as_secs_f64() * 1e3);
    }
    if open.is_empty() {
        bail!("dial: no tunnel opened");
    }
    Ok(
        json!({"count": open.len(), "errors": errors, "open": percentiles(open),
              "first_byte": percentiles(rtt)}),
    )
}

fn wait_stdin() {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

async fn idle(via: Via, counts: Vec<usize>, parallel: usize) -> anyhow::Result<()> {
    let mut held: Vec<Conn> = Vec::new();
    let mut failed = 0usize;
    let mut last_error = String::new();
    let t0 = Instant::now();
    for target in counts {
        while held.len() < target {
            let batch = parallel.min(target - held.len());
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..batch {
                let via = via.clone();
                tasks.spawn(async move {
                    let mut c = via.open().await?;
                    tokio::time::timeout(Duration::from_secs(20), echo_once(&mut c))
                        .await
                        .context("echo timed out")??;
                    anyhow::Ok(c)
                });
            }
            while let Some(r) = tasks.join_next().await {
                match r? {
                    Ok(c) => held.push(c),
                    Err(e) => {
                        failed += 1;
                        last_error = format!("{e:#}");
                    }
                }
            }
            // a failed tunnel means a limit was reached (descriptors, memory): report what is
            // held rather than waiting out the echo timeout of every further batch
            if failed > 0 {
                break;
            }
        }
        println!(
            "{}",
            json!({"target": target, "opened": held.len(), "failed": failed,
                              "open_s": t0.elapsed().as_secs_f64(), "last_error": last_error})
        );
        tokio::task::spawn_blocking(wait_stdin).await?;
    }
    Ok(())
}

async fn isolation(
    via: Via,
    streams: usize,
    stalled: usize,
    warmup: f64,
    seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    let total = Arc::new(AtomicU64::new(0));
    // Each reader starts as soon as its tunnel is open: a tunnel that streams before its reader
    // runs is a stalled reader itself (and blocks upstream's shared stream, later dials with it).
    let mut opened = 0usize;
    let mut open_errors = 0usize;
    for _ in 0..streams {
        let mut c = match tokio::time::timeout(Duration::from_secs(10), via.open()).await {
            Ok(Ok(c)) => c,
            _ => {
                open_errors += 1;
                continue;
            }
        };
        request_bytes(&mut c, u64::MAX).await?;
        opened += 1;
        let total = total.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = c.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }
    let measure = move |total: Arc<AtomicU64>| async move {
        tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
        let b0 = total.load(Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        (total.load(Ordering::Relaxed) - b0) as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9
    };
    let alone = measure(total.clone()).await;
    let mut stuck = Vec::new();
    let mut stalled_errors = 0usize;
    for _ in 0..stalled {
        match tokio::time::timeout(Duration::from_secs(10), via.open()).await {
            Ok(Ok(mut c)) => {
                request_bytes(&mut c, u64::MAX).await?;
                stuck.push(c);
            }
            _ => stalled_errors += 1,
        }
    }
    let with = measure(total.clone()).await;
    Ok(
        json!({"streams": streams, "opened": opened, "open_errors": open_errors, "stalled": stuck.len(), "stalled_errors": stalled_errors,
              "alone_gbit_s": alone, "with_stalled_gbit_s": with,
              "ratio": if alone > 0.0 { with / alone } else { 0.0 }}),
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async move {
        match args.cmd {
            Cmd::Listen {
                listen: l,
                uds,
                dest,
            } => listen(l, uds, dest).await.map(|()| None),
            Cmd::Sink { listen } => sink(listen).await.map(|()| None),
            Cmd::Bulk { via, bytes } => bulk(via, bytes).await.map(Some),
            Cmd::Dial { via, count } => dial(via, count).await.map(Some),
            Cmd::Idle {
                via,
                counts,
                parallel,
            } => idle(via, counts, parallel).await.map(|()| None),
            Cmd::Isolation {
                via,
                streams,
                stalled,
                warmup,
                seconds,
            } => isolation(via, streams, stalled, warmup, seconds)
                .await
                .map(Some),
        }
    })?;
    if let Some(v) = out {
        println!("{v}");
    }
    // Tunnels still open (isolation's streams) are dropped with the process.
    std::process::exit(0)
}
