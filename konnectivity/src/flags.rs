//! The command lines of upstream's `proxy-server` and `proxy-agent`
//! (`cmd/{server,agent}/app/options/options.go`), so that a manifest written for them works by
//! changing the image: same names, same defaults, `--flag=value` or `--flag value`, booleans
//! as `--flag` or `--flag=false`. Flags upstream has and this build does not implement are
//! accepted with a warning (they change nothing a tunnel's user sees) or refused when
//! ignoring them would be wrong; an unknown flag is an error that names it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};
use tracing::warn;

use crate::server::backends::Strategy;
use crate::{agent, server, tunnel};

fn duration(text: &str) -> Result<Duration, String> {
    agentkit::config::parse_duration(text)
}

/// `proxy-server` flags.
#[derive(Debug, Parser)]
#[command(
    name = "konnectivity-server",
    version,
    about = "konnectivity server: kube-apiserver's egress to agents dialled in from the nodes"
)]
pub struct ServerFlags {
    /// Frontend protocol: grpc or http-connect.
    #[arg(long, default_value = "grpc")]
    pub mode: String,
    /// Frontend on this Unix socket (then --server-port must be 0).
    #[arg(long, default_value = "")]
    pub uds_name: String,
    #[arg(long, default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub delete_existing_uds_file: bool,
    /// Frontend TCP port with mTLS (0: none).
    #[arg(long, default_value_t = 8090)]
    pub server_port: u16,
    #[arg(long, default_value = "")]
    pub server_bind_address: String,
    #[arg(long, default_value = "")]
    pub server_cert: String,
    #[arg(long, default_value = "")]
    pub server_key: String,
    /// CA of the frontend's client certificates (required with --server-port).
    #[arg(long, default_value = "")]
    pub server_ca_cert: String,
    #[arg(long, default_value_t = 8091)]
    pub agent_port: u16,
    #[arg(long, default_value = "")]
    pub agent_bind_address: String,
    #[arg(long, default_value = "")]
    pub cluster_cert: String,
    #[arg(long, default_value = "")]
    pub cluster_key: String,
    /// With it, agents must present client certificates signed by this CA.
    #[arg(long, default_value = "")]
    pub cluster_ca_cert: String,
    #[arg(long, default_value_t = 8092)]
    pub health_port: u16,
    #[arg(long, default_value = "")]
    pub health_bind_address: String,
    #[arg(long, default_value_t = 8095)]
    pub admin_port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_bind_address: String,
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub keepalive_time: Duration,
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub frontend_keepalive_time: Duration,
    #[arg(long, env = "PROXY_SERVER_ID", default_value = "")]
    pub server_id: String,
    #[arg(long, default_value_t = 1)]
    pub server_count: u32,
    #[arg(long, default_value = "")]
    pub agent_namespace: String,
    #[arg(long, default_value = "")]
    pub agent_service_account: String,
    #[arg(long, default_value = "")]
    pub authentication_audience: String,
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    #[arg(long, default_value_t = 0.0)]
    pub kubeconfig_qps: f32,
    #[arg(long, default_value_t = 0)]
    pub kubeconfig_burst: u32,
    #[arg(long, default_value = "")]
    pub kube_api_content_type: String,
    /// Comma list of default, destHost, defaultRoute (and cidr), tried in order.
    #[arg(long, default_value = "default")]
    pub proxy_strategies: String,
    /// Accepted for compatibility: queues here are per tunnel (see --tunnel-buffer).
    #[arg(long, default_value_t = 10)]
    pub xfr_channel_size: u32,
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub enable_lease_controller: bool,
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    #[arg(long, default_value = "k8s-app=konnectivity-server")]
    pub lease_label: String,
    #[arg(long, default_value = "")]
    pub cipher_suites: String,
    #[arg(long, default_value = "")]
    pub tls_min_version: String,
    #[arg(long, default_value = "0s", value_parser = duration)]
    pub graceful_shutdown_timeout: Duration,
    /// Longest wait for an agent's dial (0: upstream's "no limit", capped here at 5m).
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub backend_dial_timeout: Duration,
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub enable_profiling: bool,
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub enable_contention_profiling: bool,
    /// klog verbosity (use RUST_LOG for this build's logging).
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: u32,
    #[arg(long, default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub logtostderr: bool,
    /// This build: per-tunnel window granted to our agents (0 disables the extension).
    #[arg(long, default_value_t = tunnel::DEFAULT_WINDOW)]
    pub tunnel_window: u32,
    /// This build: per-tunnel queue bound toward agents without flow control.
    #[arg(long, default_value_t = tunnel::DEFAULT_BUFFER)]
    pub tunnel_buffer: usize,
    /// This build: agents tried per dial.
    #[arg(long, default_value_t = 2)]
    pub dial_attempts: usize,
    /// This build: how long a TokenReview answer is reused for the same token.
    #[arg(long, default_value = "1m", value_parser = duration)]
    pub token_review_cache_ttl: Duration,
    /// This build: also accept our agents over QUIC on this UDP port, with the agent plane's
    /// certificates (0: off). Usually the --agent-port number.
    #[arg(long, default_value_t = 0)]
    pub agent_quic_port: u16,
}

fn bind(address: &str, port: u16, default: IpAddr) -> Result<SocketAddr, String> {
    let ip = if address.is_empty() {
        default
    } else {
        address
            .parse()
            .map_err(|_| format!("{address:?} is not an IP address"))?
    };
    Ok(SocketAddr::new(ip, port))
}

fn path(flag: &str, value: &str) -> anyhow::Result<Option<PathBuf>> {
    if value.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(value);
    if !path.exists() {
        bail!("--{flag} {value}: no such file");
    }
    Ok(Some(path))
}

impl ServerFlags {
    /// The server's config; errors name the flag.
    pub fn config(&self) -> anyhow::Result<server::Config> {
        let any: IpAddr = "0.0.0.0".parse().expect("IP");
        let mode = match self.mode.as_str() {
            "grpc" => server::Mode::Grpc,
            "http-connect" => server::Mode::HttpConnect,
            other => bail!("--mode {other:?}: must be grpc or http-connect"),
        };
        let uds = (!self.uds_name.is_empty()).then(|| PathBuf::from(&self.uds_name));
        if uds.is_some() && self.server_port != 0 {
            bail!("--uds-name and --server-port are exclusive: set --server-port=0 for a UDS frontend");
        }
        let frontend_tcp = if self.server_port != 0 {
            let cert = path("server-cert", &self.server_cert)?
                .ok_or_else(|| anyhow!("--server-cert is required with --server-port"))?;
            let key = path("server-key", &self.server_key)?
                .ok_or_else(|| anyhow!("--server-key is required with --server-port"))?;
            let ca = path("server-ca-cert", &self.server_ca_cert)?
                .ok_or_else(|| anyhow!("--server-ca-cert is required with --server-port (kube-apiserver authenticates with a client certificate)"))?;
            let tls = agentkit::tls::server_config(&cert, &key, Some(&ca))
                .context("--server-cert/--server-key/--server-ca-cert")?;
            let addr = bind(&self.server_bind_address, self.server_port, any)
                .map_err(|e| anyhow!("--server-bind-address: {e}"))?;
            Some((addr, tls))
        } else {
            None
        };
        if uds.is_none() && frontend_tcp.is_none() {
            bail!("no frontend: set --uds-name (with --server-port=0) or --server-port");
        }
        let cert = path("cluster-cert", &self.cluster_cert)?
            .ok_or_else(|| anyhow!("--cluster-cert is required: agents connect with TLS"))?;
        let key = path("cluster-key", &self.cluster_key)?
            .ok_or_else(|| anyhow!("--cluster-key is required: agents connect with TLS"))?;
        let cluster_ca = path("cluster-ca-cert", &self.cluster_ca_cert)?;
        let auth_flags = !self.agent_namespace.is_empty()
            || !self.agent_service_account.is_empty()
            || !self.authentication_audience.is_empty();
        if auth_flags && cluster_ca.is_some() {
            bail!("--cluster-ca-cert and token authentication (--agent-namespace/--agent-service-account/--authentication-audience) cannot be used together");
        }
        let auth = if auth_flags {
            for (flag, value) in [
                ("agent-namespace", &self.agent_namespace),
                ("agent-service-account", &self.agent_service_account),
                ("authentication-audience", &self.authentication_audience),
            ] {
                if value.is_empty() {
                    bail!("--{flag} is required for token authentication");
                }
            }
            Some(server::AuthConfig {
                kubeconfig: path("kubeconfig", &self.kubeconfig)?,
                namespace: self.agent_namespace.clone(),
                service_account: self.agent_service_account.clone(),
                audience: self.authentication_audience.clone(),
                cache_ttl: self.token_review_cache_ttl,
            })
        } else {
            None
        };
        let agent_tls = agentkit::tls::server_config(&cert, &key, cluster_ca.as_deref())
            .context("--cluster-cert/--cluster-key/--cluster-ca-cert")?;
        let strategies = self
            .proxy_strategies
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Strategy::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("--proxy-strategies: {e}"))?;
        if strategies.is_empty() {
            bail!("--proxy-strategies: empty");
        }
        if self.enable_lease_controller {
            warn!("--enable-lease-controller is not implemented in this build: give agents --server-count or a list of servers");
        }
        if !self.cipher_suites.is_empty() || !self.tls_min_version.is_empty() {
            warn!("--cipher-suites and --tls-min-version are ignored: rustls offers TLS 1.2 and 1.3 with safe suites only");
        }
        let server_id = if self.server_id.is_empty() {
            random_id()
        } else {
            self.server_id.clone()
        };
        let backend_dial_timeout = if self.backend_dial_timeout.is_zero() {
            Duration::from_secs(300)
        } else {
            self.backend_dial_timeout
        };
        Ok(server::Config {
            mode,
            uds,
            delete_existing_uds_file: self.delete_existing_uds_file,
            frontend_tcp,
            agent_addr: bind(&self.agent_bind_address, self.agent_port, any)
                .map_err(|e| anyhow!("--agent-bind-address: {e}"))?,
            agent_quic_addr: (self.agent_quic_port != 0)
                .then(|| bind(&self.agent_bind_address, self.agent_quic_port, any))
                .transpose()
                .map_err(|e| anyhow!("--agent-bind-address: {e}"))?,
            agent_tls,
            health_addr: (self.health_port != 0)
                .then(|| bind(&self.health_bind_address, self.health_port, any))
                .transpose()
                .map_err(|e| anyhow!("--health-bind-address: {e}"))?,
            admin_addr: (self.admin_port != 0)
                .then(|| bind(&self.admin_bind_address, self.admin_port, any))
                .transpose()
                .map_err(|e| anyhow!("--admin-bind-address: {e}"))?,
            server_id,
            server_count: self.server_count.max(1),
            strategies,
            backend_dial_timeout,
            dial_attempts: self.dial_attempts.max(1),
            window: self.tunnel_window,
            buffer: self.tunnel_buffer.max(tunnel::CHUNK),
            graceful_shutdown_timeout: self.graceful_shutdown_timeout,
            auth,
        })
    }
}

/// `proxy-agent` flags.
#[derive(Debug, Parser)]
#[command(
    name = "konnectivity-agent",
    version,
    about = "konnectivity agent: dials out to the servers and carries their tunnels"
)]
pub struct AgentFlags {
    #[arg(long, default_value = "127.0.0.1")]
    pub proxy_server_host: String,
    #[arg(long, default_value_t = 8091)]
    pub proxy_server_port: u16,
    /// CA that signed the server's certificate.
    #[arg(long, default_value = "")]
    pub ca_cert: String,
    #[arg(long, default_value = "")]
    pub agent_cert: String,
    #[arg(long, default_value = "")]
    pub agent_key: String,
    /// Extra ALPN protocols after h2 (to share a port with kube-apiserver).
    #[arg(long, value_delimiter = ',')]
    pub alpn_proto: Vec<String>,
    #[arg(long, default_value = "")]
    pub service_account_token_path: String,
    #[arg(long, env = "PROXY_AGENT_ID", default_value = "")]
    pub agent_id: String,
    #[arg(long, default_value = "")]
    pub agent_identifiers: String,
    #[arg(long, default_value = "")]
    pub health_server_host: String,
    #[arg(long, default_value_t = 8093)]
    pub health_server_port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_bind_address: String,
    #[arg(long, default_value_t = 8094)]
    pub admin_server_port: u16,
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub sync_interval: Duration,
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub sync_interval_cap: Duration,
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub probe_interval: Duration,
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub keepalive_time: Duration,
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub sync_forever: bool,
    /// Accepted for compatibility: queues here are per tunnel (see --tunnel-buffer).
    #[arg(long, default_value_t = 150)]
    pub xfr_channel_size: u32,
    #[arg(long, default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub count_server_leases: bool,
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    #[arg(long, default_value = "k8s-app=konnectivity-server")]
    pub lease_label_selector: String,
    #[arg(long, default_value = "default")]
    pub server_count_source: String,
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: u32,
    #[arg(long, default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub logtostderr: bool,
    /// This build: bound of one dial to a destination (upstream hard-codes 5s).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub dial_timeout: Duration,
    /// This build: per-tunnel window granted to our servers (0 disables the extension).
    #[arg(long, default_value_t = tunnel::DEFAULT_WINDOW)]
    pub tunnel_window: u32,
    /// This build: per-tunnel queue bound toward servers without flow control.
    #[arg(long, default_value_t = tunnel::DEFAULT_BUFFER)]
    pub tunnel_buffer: usize,
    /// This build: how long open tunnels may finish after DRAIN on SIGTERM.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// This build: how to reach the server: grpc (HTTP/2 over TCP, as upstream), quic (one
    /// QUIC stream per tunnel; the server needs --agent-quic-port), or auto (QUIC, falling
    /// back to grpc where UDP is blocked).
    #[arg(long, default_value = "grpc")]
    pub transport: String,
    /// This build: the server's QUIC (UDP) port (0: the --proxy-server-port number).
    #[arg(long, default_value_t = 0)]
    pub proxy_server_quic_port: u16,
}

impl AgentFlags {
    /// The agent's config; errors name the flag.
    pub fn config(&self) -> anyhow::Result<agent::Config> {
        let ca = path("ca-cert", &self.ca_cert)?
            .ok_or_else(|| anyhow!("--ca-cert is required: the server is verified with it"))?;
        let mut tls = match (
            path("agent-cert", &self.agent_cert)?,
            path("agent-key", &self.agent_key)?,
        ) {
            (Some(cert), Some(key)) => agentkit::tls::client_config_with_cert(&ca, &cert, &key)
                .context("--ca-cert/--agent-cert/--agent-key")?,
            (None, None) => agentkit::tls::client_config(&ca).context("--ca-cert")?,
            _ => bail!("--agent-cert and --agent-key go together"),
        };
        let mut alpn = vec![b"h2".to_vec()];
        alpn.extend(
            self.alpn_proto
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| p.as_bytes().to_vec()),
        );
        Arc::make_mut(&mut tls).alpn_protocols = alpn;
        if self.count_server_leases {
            warn!("--count-server-leases is not implemented in this build: the server count comes from the servers' servercount header");
        }
        let token_path = path(
            "service-account-token-path",
            &self.service_account_token_path,
        )?;
        if !self.agent_identifiers.is_empty() {
            server::backends::Identifiers::parse(&self.agent_identifiers)
                .map_err(|e| anyhow!("--agent-identifiers: {e}"))?;
        }
        let transport =
            agent::Transport::parse(&self.transport).map_err(|e| anyhow!("--transport: {e}"))?;
        let any: IpAddr = "0.0.0.0".parse().expect("IP");
        let local: IpAddr = "127.0.0.1".parse().expect("IP");
        Ok(agent::Config {
            transport,
            quic_port: match self.proxy_server_quic_port {
                0 => self.proxy_server_port,
                port => port,
            },
            server_host: self.proxy_server_host.clone(),
            server_port: self.proxy_server_port,
            tls,
            token_path,
            agent_id: if self.agent_id.is_empty() {
                random_id()
            } else {
                self.agent_id.clone()
            },
            identifiers: self.agent_identifiers.clone(),
            health_addr: (self.health_server_port != 0)
                .then(|| bind(&self.health_server_host, self.health_server_port, any))
                .transpose()
                .map_err(|e| anyhow!("--health-server-host: {e}"))?,
            admin_addr: (self.admin_server_port != 0)
                .then(|| bind(&self.admin_bind_address, self.admin_server_port, local))
                .transpose()
                .map_err(|e| anyhow!("--admin-bind-address: {e}"))?,
            sync_interval: self.sync_interval.max(Duration::from_millis(10)),
            sync_interval_cap: self.sync_interval_cap.max(self.sync_interval),
            sync_forever: self.sync_forever,
            keepalive: self.keepalive_time.max(Duration::from_secs(1)),
            dial_timeout: self.dial_timeout,
            window: self.tunnel_window,
            buffer: self.tunnel_buffer.max(tunnel::CHUNK),
            drain_timeout: self.drain_timeout,
        })
    }
}

/// A random UUID-shaped ID (upstream's default server and agent IDs).
pub fn random_id() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn upstream_manifest_flags_parse() {
        // Gardener's konnectivity-server args (reference §5.2) and the k8s docs' agent args.
        let server = ServerFlags::try_parse_from([
            "proxy-server",
            "--mode=http-connect",
            "--server-port=9443",
            "--agent-port=8132",
            "--admin-port=8133",
            "--health-port=8134",
            "--keepalive-time=1m",
            "--agent-namespace=kube-system",
            "--agent-service-account=konnectivity-agent",
            "--authentication-audience=system:konnectivity-server",
            "--server-count=2",
            "--delete-existing-uds-file",
            "--v=2",
            "--proxy-strategies=destHost,default",
        ])
        .unwrap();
        assert_eq!(server.server_port, 9443);
        assert_eq!(server.keepalive_time, Duration::from_secs(60));
        assert!(server.delete_existing_uds_file);
        let agent = AgentFlags::try_parse_from([
            "proxy-agent",
            "--logtostderr=true",
            "--ca-cert=/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
            "--proxy-server-host=konnectivity-server.kube-system",
            "--proxy-server-port=8132",
            "--admin-server-port=8133",
            "--health-server-port=8134",
            "--service-account-token-path=/var/run/secrets/tokens/konnectivity-agent-token",
            "--sync-forever=false",
            "--agent-identifiers=host=node1&ipv4=10.0.0.1",
        ])
        .unwrap();
        assert_eq!(agent.proxy_server_port, 8132);
        assert!(!agent.sync_forever);
    }

    #[test]
    fn unknown_and_bad_flags_name_themselves() {
        let error = ServerFlags::try_parse_from(["s", "--no-such-flag=1"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--no-such-flag"), "{error}");
        let error = AgentFlags::try_parse_from(["a", "--sync-interval=soon"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--sync-interval"), "{error}");
        let flags = AgentFlags::try_parse_from(["a", "--ca-cert=/x", "--transport=udp"]).unwrap();
        let error = format!("{:#}", flags.config().unwrap_err());
        assert!(
            error.contains("--transport") || error.contains("--ca-cert"),
            "{error}"
        );
        let flags = ServerFlags::try_parse_from([
            "s",
            "--mode=quic",
            "--uds-name=/tmp/x",
            "--server-port=0",
        ])
        .unwrap();
        assert!(flags.config().unwrap_err().to_string().contains("--mode"));
        let flags = ServerFlags::try_parse_from(["s", "--uds-name=/tmp/x"]).unwrap();
        assert!(flags
            .config()
            .unwrap_err()
            .to_string()
            .contains("--server-port"));
        let flags = ServerFlags::try_parse_from([
            "s",
            "--server-port=0",
            "--uds-name=/tmp/x",
            "--proxy-strategies=nearest",
        ])
        .unwrap();
        let error = flags.config().unwrap_err().to_string();
        assert!(
            error.contains("--cluster-cert") || error.contains("--proxy-strategies"),
            "{error}"
        );
    }

    #[test]
    fn random_ids_look_like_uuids() {
        let id = random_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert_ne!(id, random_id());
    }
}
