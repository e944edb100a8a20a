//! Privileged: the socket splice on this kernel (needs root to load the program).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use agentkit::testing::require_privileges;
use ebpf::sockmap::{self, Flush, Leg, Peek, Side, Splicer};

#[test]
fn self_test_passes_on_this_kernel() {
    if !require_privileges("self_test_passes_on_this_kernel") {
        return;
    }
    sockmap::kernel_supported().unwrap();
    let splicer = Splicer::load(1024).unwrap();
    splicer.self_test().unwrap();
    // The bytes after the splice went through the kernel program, not around it.
    assert!(splicer.stat(sockmap::Stat::RedirectedBytes).unwrap() >= 2 << 20);
    assert_eq!(splicer.stat(sockmap::Stat::NoPeerSkbs).unwrap(), 0);
}

const BLOCK: usize = 64 * 1024;

/// Block `index` of stream `id`: a fixed pattern headed by the index and the id, so that a
/// repeated or lost skb shows up as a shifted header.
fn block(id: u64, index: u64, out: &mut [u8]) {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let pattern = PATTERN.get_or_init(|| {
        (0..BLOCK as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    });
    out.copy_from_slice(pattern);
    out[..8].copy_from_slice(&index.to_be_bytes());
    out[8..16].copy_from_slice(&id.to_be_bytes());
}

fn send(mut s: &TcpStream, id: u64, blocks: u64) {
    let mut buf = vec![0u8; BLOCK];
    for index in 0..blocks {
        block(id, index, &mut buf);
        s.write_all(&buf).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// Reads `blocks` blocks of stream `id` and EOF; the error says where it went wrong and by how
/// much the stream was shifted.
fn expect(mut s: &TcpStream, id: u64, blocks: u64) -> Result<(), String> {
    let (mut got, mut want) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    for index in 0..blocks {
        s.read_exact(&mut got)
            .map_err(|e| format!("stream {id}: {e} in block {index}"))?;
        block(id, index, &mut want);
        if got != want {
            // Reported from here: the other directions would wait on this one forever.
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            let mut more = vec![0u8; 4 * BLOCK];
            let _ = s.read_exact(&mut more);
            got.extend_from_slice(&more);
            let next: Vec<u8> = [(index + 1).to_be_bytes(), id.to_be_bytes()].concat();
            let shift = got
                .windows(16)
                .position(|w| w == next)
                .map(|p| p as i64 - BLOCK as i64);
            fail(&format!(
                "stream {id}: block {index} differs from byte {at}; the next block starts {shift:?} bytes late"
            ));
        }
    }
    let mut one = [0u8; 1];
    match s.read(&mut one) {
        Ok(0) => Ok(()),
        other => Err(format!("stream {id}: {other:?} instead of EOF")),
    }
}

/// After `send` finished on the far side of `src`: waits for the EOF and the flush, then
/// passes the FIN on to `dst`.
fn pass_eof(pair: &sockmap::Pair<'_>, from: Side, src: &TcpStream, dst: &TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while sockmap::peek(src.as_fd()).unwrap() != Peek::Eof {
        assert!(Instant::now() < deadline, "no EOF");
        std::thread::sleep(Duration::from_millis(2));
    }
    loop {
        match pair.flushed(from).unwrap() {
            Flush::Done(_) => break,
            Flush::Broken => panic!("target broke"),
            Flush::Excess(n) => fail(&format!("the kernel repeated {n} bytes")),
            Flush::Pending => std::thread::sleep(Duration::from_millis(1)),
        }
        assert!(Instant::now() < deadline, "no flush");
    }
    dst.shutdown(Shutdown::Write).unwrap();
}

/// The kernel check behind `sockmap::TRUSTED_KERNELS`: four spliced connections carrying
/// 512 MiB each way at once, every byte compared. On 6.18.44 about half the runs fail with
/// whole skbs sent twice ("the next block starts Some(65483) bytes late", sometimes 130966)
/// and some stall. Run it many times (`cargo test --release -p ebpf --test sockmap --
/// --ignored`) before trusting a kernel.
#[test]
#[ignore = "fails on 6.18.44: the kernel sends skbs twice under concurrent two-way load"]
fn two_way_bulk_through_four_splices_arrives_exactly() {
    if !require_privileges("two_way_bulk_through_four_splices_arrives_exactly") {
        return;
    }
    const CONNS: u64 = 4;
    const BLOCKS: u64 = 512 * 1024 * 1024 / BLOCK as u64;
    let splicer = Splicer::load(1024).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let connect = || {
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        // Lost bytes would leave a reader waiting: fail instead.
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        }
        (a, b)
    };
    // client <-> [proxy_client | splice | proxy_backend] <-> server
    let legs: Vec<_> = (0..CONNS)
        .map(|_| {
            let (client, proxy_client) = connect();
            let (proxy_backend, server) = connect();
            (client, proxy_client, proxy_backend, server)
        })
        .collect();
    std::thread::scope(|scope| {
        for (id, (client, proxy_client, proxy_backend, server)) in legs.iter().enumerate() {
            let (id, splicer) = (id as u64, &splicer);
            scope.spawn(move || {
                let pair = splicer
                    .splice(
                        Leg {
                            fd: proxy_client.as_fd(),
                            read_before: 0,
                        },
                        Leg {
                            fd: proxy_backend.as_fd(),
                            read_before: 0,
                        },
                    )
                    .unwrap();
                std::thread::scope(|inner| {
                    let up = inner.spawn(|| expect(server, id, BLOCKS));
                    let down = inner.spawn(|| expect(client, id + 100, BLOCKS));
                    let server_sends = inner.spawn(|| send(server, id + 100, BLOCKS));
                    send(client, id, BLOCKS);
                    pass_eof(&pair, Side::A, proxy_client, proxy_backend);
                    server_sends.join().unwrap();
                    pass_eof(&pair, Side::B, proxy_backend, proxy_client);
                    for result in [up.join().unwrap(), down.join().unwrap()] {
                        if let Err(e) = result {
                            fail(&e);
                        }
                    }
                });
            });
        }
    });
}

/// A wrong byte leaves readers and writers blocked on each other: say why and end the run.
fn fail(why: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "{why}");
    std::process::exit(101);
}
