//! The demo's log-shipper part: fake control-plane pods of two shoots and one seed component
//! write CRI logs under a pod log root; the agent ships them to VictoriaLogs (each shoot's
//! lines to its own store, told apart by a `store` field); `log-shipper query --shoot` prints
//! one shoot's lines, then follows as its kube-apiserver writes more. Skipped with a one-line
//! hint when VictoriaLogs cannot be built (no `go`).

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentkit::testing::victoria_logs::{self, VictoriaLogs};
use agentkit::Shutdown;
use anyhow::Context as _;
use clap::Parser as _;

/// What the part showed, for the demo's exit code, and what runs on for the commands to try.
pub struct Outcome {
    pub ok: bool,
    running: Option<(VictoriaLogs, Shutdown, log_shipper::run::Agent)>,
}

impl Outcome {
    /// Stops the agent and the store.
    pub async fn finish(self) -> anyhow::Result<()> {
        if let Some((store, shutdown, agent)) = self.running {
            shutdown.stop_accepting();
            agent.wait(Duration::from_secs(5)).await?;
            drop(store);
        }
        Ok(())
    }
}

/// The pods: namespace, pod, container, and lines they log.
const PODS: [(&str, &str, &str, &[&str]); 4] = [
    (
        "shoot--dev--s1",
        "kube-apiserver-7d9f8-x2x4q",
        "kube-apiserver",
        &[
            "I1206 Serving securely on [::]:443",
            "I1206 \"Started watch\" resource=\"pods\"",
        ],
    ),
    (
        "shoot--dev--s1",
        "etcd-main-0",
        "etcd",
        &["{\"level\":\"info\",\"msg\":\"ready to serve client requests\"}"],
    ),
    (
        "shoot--dev--s2",
        "kube-apiserver-5c6b7-9kq2w",
        "kube-apiserver",
        &["I1206 Serving securely on [::]:443"],
    ),
    (
        "garden",
        "gardenlet-6f7d8-abcde",
        "gardenlet",
        &["{\"level\":\"info\",\"msg\":\"Reconciling Shoot\",\"shoot\":\"dev/s1\"}"],
    ),
];

/// A CRI timestamp (RFC 3339 with nanoseconds, UTC) of now plus `offset_ms`.
fn cri_now(offset_ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        + Duration::from_millis(offset_ms);
    log_shipper::query::time::format_rfc3339(now.as_nanos() as i64)
}

/// Appends `lines` to the container's `0.log` as the runtime writes them.
fn append(root: &Path, ns: &str, pod: &str, container: &str, lines: &[&str]) -> anyhow::Result<()> {
    let dir = root.join(format!("{ns}_{pod}_0d3c-{pod}")).join(container);
    fs::create_dir_all(&dir)?;
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("0.log"))?;
    for (i, line) in lines.iter().enumerate() {
        writeln!(file, "{} stdout F {line}", cri_now(i as u64))?;
    }
    Ok(())
}

/// The flags of `log-shipper query`, parsed as the binary parses them.
#[derive(clap::Parser)]
struct Query {
    #[command(flatten)]
    args: log_shipper::query::Args,
}

/// Runs `log-shipper query ARGS` in-process, as an operator would type it.
async fn query(args: &[&str]) -> anyhow::Result<()> {
    let parsed = Query::try_parse_from(std::iter::once("query").chain(args.iter().copied()))?;
    log_shipper::query::client::run(&parsed.args)
        .await
        .map_err(|e| anyhow::anyhow!("log-shipper query: {e}"))
}

pub async fn run(dir: &Path) -> anyhow::Result<Outcome> {
    println!("\nlog-shipper demo: control-plane logs of two shoots, each to its own store\n");
    let binary = match victoria_logs::binary(false)? {
        Some(b) => b,
        None if which_go() => {
            println!("  building VictoriaLogs from the Go module proxy (first run only, a few minutes) ...");
            match victoria_logs::binary(true)? {
                Some(b) => b,
                None => anyhow::bail!("scripts/vlogs-bin built nothing"),
            }
        }
        None => {
            println!("  log-shipper part skipped: VictoriaLogs is not built and there is no `go` to build it (scripts/vlogs-bin)");
            return Ok(Outcome {
                ok: true,
                running: None,
            });
        }
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let store = VictoriaLogs::start(&binary, port, dir.join("victoria-logs"))?;
    let pods = dir.join("pods");
    for (ns, pod, container, lines) in PODS {
        append(&pods, ns, pod, container, lines)?;
    }
    let config_path = dir.join("log-shipper.yaml");
    let push = format!("{}/insert/loki/api/v1/push", store.url());
    fs::write(
        &config_path,
        format!(
            "admin: {{address: \"127.0.0.1:0\"}}\n\
             input: {{path: {pods}, checkpoint_dir: {ck}, rescan_interval: 200ms}}\n\
             stores:\n  seed:  {{url: \"{push}?extra_fields=store=seed\", protocol: loki}}\n  \
             shoot: {{url: \"{push}?extra_fields=store={{namespace}}\", protocol: loki}}\n\
             delivery: {{batch_wait: 200ms}}\n",
            pods = pods.display(),
            ck = dir.join("checkpoints").display(),
        ),
    )?;
    let config = log_shipper::Config::load(&config_path)?;
    let shutdown = Shutdown::new();
    let agent = log_shipper::run::start(config, shutdown.clone())
        .await
        .context("starting log-shipper")?;
    for (ns, pod, container, lines) in PODS {
        println!("  {ns:<16} {pod}/{container}: {} lines", lines.len());
    }
    let total: usize = PODS.iter().map(|p| p.3.len()).sum();
    let admin = agent.admin_addr();
    let shipped = wait_accepted(admin, total).await?;
    println!("  shipped: {shipped} of {total} lines acknowledged by their stores\n");
    // VictoriaLogs makes what it took searchable within a second or so; the demo asks at once.
    super::fetch(
        format!("127.0.0.1:{}", store.port).parse()?,
        "/internal/force_flush",
    )
    .await?;

    let config_arg = config_path.display().to_string();
    println!("$ log-shipper query --config {config_arg} --shoot dev/s1 --since 5m");
    query(&[
        "--config",
        &config_arg,
        "--shoot",
        "dev/s1",
        "--since",
        "5m",
    ])
    .await?;
    println!("\n$ log-shipper query --config {config_arg} --shoot dev/s1 '{{container_name=\"kube-apiserver\"}}' --follow   (3 new lines, shown once 5 s old)");
    let follow = {
        let config_arg = config_arg.clone();
        tokio::spawn(async move {
            query(&[
                "--config",
                &config_arg,
                "--shoot",
                "dev/s1",
                "{container_name=\"kube-apiserver\"}",
                "--since",
                "1s",
                "--follow",
            ])
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ns, pod, container, _) = PODS[0];
    for i in 1..=3 {
        append(
            &pods,
            ns,
            pod,
            container,
            &[&format!(
                "I1206 \"HTTP\" verb=\"GET\" URI=\"/api/v1/namespaces/kube-system/pods\" seq={i}"
            )],
        )?;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let followed = wait_accepted(admin, total + 3).await?;
    // VictoriaLogs' tail shows a line once it is about 5 s old.
    tokio::time::sleep(Duration::from_secs(7)).await;
    follow.abort();
    println!("\n  Try it by hand:");
    println!(
        "    log-shipper query --store {} --shoot dev/s2",
        store.url()
    );
    println!("    log-shipper query --config {config_arg} '{{namespace_name=\"garden\"}}' -o json");
    Ok(Outcome {
        ok: shipped == total && followed == total + 3,
        running: Some((store, shutdown, agent)),
    })
}

fn which_go() -> bool {
    std::process::Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Waits (10 s at most) until the stores acknowledged `want` entries; what they did.
async fn wait_accepted(admin: std::net::SocketAddr, want: usize) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = super::fetch(admin, "/metrics").await?;
        let accepted: usize = text
            .lines()
            .filter(|l| l.starts_with("log_shipper_entries_accepted_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as usize)
            .sum();
        if accepted >= want || tokio::time::Instant::now() > deadline {
            return Ok(accepted);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
