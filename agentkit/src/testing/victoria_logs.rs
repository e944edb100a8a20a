//! A real log store for tests and the demo: VictoriaLogs (it takes the Loki push API and OTLP
//! and answers LogsQL queries), built by `scripts/vlogs-bin` from the Go module proxy and
//! cached outside the clone. [`VictoriaLogs::start`] runs one on 127.0.0.1 with storage of its
//! own; it is killed and its storage removed when the value is dropped.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// How long a started server may take to listen.
pub const START_BOUND: Duration = Duration::from_secs(20);

/// The `victoria-logs` binary: `Some` if built. With `build`, builds it first when it is not
/// (minutes from nothing; `scripts/vlogs-bin` prints its progress on stderr).
pub fn binary(build: bool) -> anyhow::Result<Option<PathBuf>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/vlogs-bin");
    let mut command = Command::new(&script);
    if !build {
        command.arg("--built");
    }
    let out = command
        .stderr(if build {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    match out.status.code() {
        Some(0) => Ok(Some(
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("victoria-logs"),
        )),
        Some(3) if !build => Ok(None),
        _ => bail!("{} failed ({})", script.display(), out.status),
    }
}

/// A running VictoriaLogs.
#[derive(Debug)]
pub struct VictoriaLogs {
    child: Child,
    storage: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Drop for VictoriaLogs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.storage);
    }
}

impl VictoriaLogs {
    /// Starts `binary` on `port` with its storage in `storage` (emptied first), and waits
    /// ([`START_BOUND`] at most) until it listens.
    pub fn start(binary: &Path, port: u16, storage: PathBuf) -> anyhow::Result<VictoriaLogs> {
        let _ = std::fs::remove_dir_all(&storage);
        let mut server = VictoriaLogs {
            child: Command::new(binary)
                .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
                .arg(format!("-storageDataPath={}", storage.display()))
                .arg("-loggerLevel=ERROR")
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?,
            storage,
            port,
        };
        let deadline = Instant::now() + START_BOUND;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                bail!("victoria-logs exited at start ({status})");
            }
            if Instant::now() > deadline {
                bail!("victoria-logs did not listen on {port} within {START_BOUND:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    /// The base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
