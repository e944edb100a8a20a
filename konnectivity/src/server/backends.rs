//! The agents connected to this server and how a dial picks one: the proxy strategies
//! (`default`, `destHost`, `defaultRoute`, and `cidr`, which upstream parses but never uses),
//! walked in the configured order, non-draining agents first, random within a strategy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agentkit::sync::lock;
use ipnet::IpNet;
use rand::seq::SliceRandom as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::proto::packet::Packet;
use crate::quic::QuicTunnel;
use crate::transport::Agreed;
use crate::tunnel::{Credit, Queue, QueueRx};

/// How a server chooses agents for a dial (`--proxy-strategies`, in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Any agent.
    Default,
    /// An agent whose `host`, `ipv4` or `ipv6` identifier equals the destination's host.
    DestHost,
    /// An agent that announced `default-route=true`.
    DefaultRoute,
    /// An agent whose `cidr` identifiers contain the destination's IP.
    Cidr,
}

impl Strategy {
    pub fn parse(name: &str) -> Result<Strategy, String> {
        match name.trim() {
            "default" => Ok(Strategy::Default),
            "destHost" => Ok(Strategy::DestHost),
            "defaultRoute" => Ok(Strategy::DefaultRoute),
            "cidr" => Ok(Strategy::Cidr),
            other => Err(format!(
                "unknown proxy strategy {other:?} (default, destHost, defaultRoute, cidr)"
            )),
        }
    }

    /// The metric label (upstream's names).
    pub fn label(self) -> &'static str {
        match self {
            Strategy::Default => "default",
            Strategy::DestHost => "destHost",
            Strategy::DefaultRoute => "defaultRoute",
            Strategy::Cidr => "cidr",
        }
    }
}

/// What an agent announced in `agentidentifiers` (URL-query encoded; unknown types ignored,
/// as upstream does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identifiers {
    pub hosts: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub cidrs: Vec<IpNet>,
    pub default_route: bool,
}

impl Identifiers {
    pub fn parse(query: &str) -> Result<Identifiers, String> {
        let mut ids = Identifiers::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value).ok_or_else(|| format!("bad escape in {pair:?}"))?;
            match key {
                "host" => ids.hosts.push(value),
                "ipv4" | "ipv6" => ids.ips.push(
                    value
                        .parse()
                        .map_err(|_| format!("{key}={value:?} is not an IP address"))?,
                ),
                "cidr" => ids.cidrs.push(
                    value
                        .parse()
                        .map_err(|_| format!("cidr={value:?} is not a CIDR"))?,
                ),
                "default-route" => ids.default_route = value == "true",
                _ => {}
            }
        }
        Ok(ids)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// How a dial ended, as the agent's stream reader reports it to the waiting frontend.
#[derive(Debug)]
pub enum DialOutcome {
    /// Established: the tunnel's id and how its bytes travel.
    Connected {
        connect_id: i64,
        link: Link,
        orphan: Orphan,
    },
    /// The agent's error string.
    Refused(String),
}

/// How an established tunnel's bytes travel between the server and the agent.
#[derive(Debug)]
pub enum Link {
    /// As packets on the agent's shared stream (gRPC): the tunnel's queue (registered in
    /// [`Backend::tunnels`]) and its send credit.
    Stream { rx: QueueRx, credit: Credit },
    /// On the tunnel's own QUIC stream.
    Quic(QuicTunnel),
}

/// Closes a tunnel that was established for a dial whose frontend had already gone when the
/// answer arrived (the answer sat in the channel and was dropped with it), unless defused.
#[derive(Debug)]
pub struct Orphan {
    backend: Option<Arc<Backend>>,
    connect_id: i64,
}

impl Orphan {
    pub fn new(backend: Arc<Backend>, connect_id: i64) -> Orphan {
        Orphan {
            backend: Some(backend),
            connect_id,
        }
    }

    /// The tunnel found its frontend.
    pub fn defuse(mut self) {
        self.backend = None;
    }
}

impl Drop for Orphan {
    fn drop(&mut self) {
        if let Some(backend) = self.backend.take() {
            if lock(&backend.tunnels).remove(&self.connect_id).is_some() {
                backend.send_control(Packet::CloseRequest {
                    connect_id: self.connect_id,
                });
            }
        }
    }
}

/// An established tunnel as the agent's stream reader sees it.
#[derive(Debug)]
pub struct TunnelEntry {
    pub queue: Queue,
    pub credit: Credit,
}

static NEXT_BACKEND: AtomicU64 = AtomicU64::new(1);

/// One agent's `Connect` stream to this server.
#[derive(Debug)]
pub struct Backend {
    pub serial: u64,
    pub agent_id: String,
    pub identifiers: Identifiers,
    pub extensions: Agreed,
    /// Control packets (never wait: the stream reader sends on it).
    pub control: mpsc::UnboundedSender<Packet>,
    /// DATA packets (bounded: a frontend reader waits here when the stream is busy).
    pub data: mpsc::Sender<Packet>,
    pub draining: AtomicBool,
    pub pending: Mutex<HashMap<i64, oneshot::Sender<DialOutcome>>>,
    pub tunnels: Mutex<HashMap<i64, TunnelEntry>>,
    /// Cancelled when the stream ends.
    pub closed: CancellationToken,
    /// The agent is connected over QUIC: tunnels arrive as streams of their own.
    pub quic: bool,
}

impl Backend {
    pub fn new(
        agent_id: String,
        identifiers: Identifiers,
        extensions: Agreed,
        control: mpsc::UnboundedSender<Packet>,
        data: mpsc::Sender<Packet>,
    ) -> Backend {
        Backend {
            serial: NEXT_BACKEND.fetch_add(1, Ordering::Relaxed),
            agent_id,
            identifiers,
            extensions,
            control,
            data,
            draining: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            tunnels: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
            quic: false,
        }
    }

    /// The agent is connected over QUIC.
    pub fn over_quic(mut self) -> Backend {
        self.quic = true;
        self
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Sends a control packet (dropped if the stream is gone).
    pub fn send_control(&self, packet: Packet) {
        let _ = self.control.send(packet);
    }
}

/// Every connected agent, by agent ID (an agent's first stream is the one used, as upstream).
#[derive(Debug)]
pub struct Backends {
    strategies: Vec<Strategy>,
    agents: Mutex<Vec<(String, Vec<Arc<Backend>>)>>,
}

impl Backends {
    pub fn new(strategies: Vec<Strategy>) -> Backends {
        Backends {
            strategies,
            agents: Mutex::new(Vec::new()),
        }
    }

    pub fn strategies(&self) -> &[Strategy] {
        &self.strategies
    }

    pub fn add(&self, backend: Arc<Backend>) {
        let mut agents = lock(&self.agents);
        match agents.iter_mut().find(|(id, _)| *id == backend.agent_id) {
            Some((_, streams)) => streams.push(backend),
            None => agents.push((backend.agent_id.clone(), vec![backend])),
        }
    }

    pub fn remove(&self, backend: &Backend) {
        let mut agents = lock(&self.agents);
        for (_, streams) in agents.iter_mut() {
            streams.retain(|b| b.serial != backend.serial);
        }
        agents.retain(|(_, streams)| !streams.is_empty());
    }

    /// The agents a dial to `address` may use, best first: strategy by strategy, each
    /// strategy's matches shuffled with the non-draining ones first; each agent once.
    pub fn candidates(&self, address: &str) -> Vec<Arc<Backend>> {
        let host = split_host(address);
        let ip: Option<IpAddr> = host.parse().ok();
        let agents = lock(&self.agents);
        let mut out: Vec<Arc<Backend>> = Vec::new();
        let mut rng = rand::rng();
        for strategy in &self.strategies {
            let mut matching: Vec<Arc<Backend>> = agents
                .iter()
                .filter_map(|(_, streams)| streams.first())
                .filter(|b| matches(strategy, b, host, ip))
                .filter(|b| !out.iter().any(|o| o.serial == b.serial))
                .cloned()
                .collect();
            matching.shuffle(&mut rng);
            matching.sort_by_key(|b| b.is_draining());
            out.extend(matching);
        }
        // Draining agents only after every non-draining one, whatever the strategy.
        out.sort_by_key(|b| b.is_draining());
        out
    }

    /// Agents (first streams) usable by `strategy`, not draining.
    pub fn ready(&self, strategy: Strategy) -> usize {
        lock(&self.agents)
            .iter()
            .filter_map(|(_, streams)| streams.first())
            .filter(|b| !b.is_draining())
            .filter(|b| match strategy {
                Strategy::Default => true,
                Strategy::DestHost => {
                    !b.identifiers.hosts.is_empty() || !b.identifiers.ips.is_empty()
                }
                Strategy::DefaultRoute => b.identifiers.default_route,
                Strategy::Cidr => !b.identifiers.cidrs.is_empty(),
            })
            .count()
    }

    /// Every connected stream (all agents, all streams).
    pub fn streams(&self) -> usize {
        lock(&self.agents).iter().map(|(_, s)| s.len()).sum()
    }

    /// Every stream, to drain or count tunnels.
    pub fn all(&self) -> Vec<Arc<Backend>> {
        lock(&self.agents)
            .iter()
            .flat_map(|(_, s)| s.iter().cloned())
            .collect()
    }
}

fn matches(strategy: &Strategy, b: &Backend, host: &str, ip: Option<IpAddr>) -> bool {
    let ids = &b.identifiers;
    match strategy {
        Strategy::Default => true,
        Strategy::DestHost => {
            ids.hosts.iter().any(|h| h == host) || ip.is_some_and(|ip| ids.ips.contains(&ip))
        }
        Strategy::DefaultRoute => ids.default_route,
        Strategy::Cidr => ip.is_some_and(|ip| ids.cidrs.iter().any(|net| net.contains(&ip))),
    }
}

/// The host of `host:port` (`[v6]:port` too), or the whole string without a port.
pub fn split_host(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((host, _)) if !host.contains(':') => host,
        _ => address,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn backend(id: &str, identifiers: &str) -> Arc<Backend> {
        let (control, _) = mpsc::unbounded_channel();
        let (data, _) = mpsc::channel(1);
        Arc::new(Backend::new(
            id.into(),
            Identifiers::parse(identifiers).unwrap(),
            Agreed::default(),
            control,
            data,
        ))
    }

    fn ids(list: &[Arc<Backend>]) -> Vec<&str> {
        list.iter().map(|b| b.agent_id.as_str()).collect()
    }

    #[test]
    fn identifiers_parse_like_a_url_query() {
        let ids = Identifiers::parse(
            "host=node%2D1&ipv4=10.250.0.5&ipv6=fd00::5&cidr=10.0.0.0/8&default-route=true&uid=x&future=1",
        )
        .unwrap();
        assert_eq!(ids.hosts, ["node-1"]);
        assert_eq!(ids.ips.len(), 2);
        assert_eq!(ids.cidrs, ["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert!(ids.default_route);
        assert!(Identifiers::parse("ipv4=banana").is_err());
    }

    #[test]
    fn strategies_in_order_with_draining_agents_last() {
        let backends = Backends::new(vec![
            Strategy::DestHost,
            Strategy::Cidr,
            Strategy::DefaultRoute,
        ]);
        backends.add(backend("node-a", "ipv4=10.250.0.5&host=node-a"));
        backends.add(backend("node-b", "cidr=10.96.0.0/12"));
        backends.add(backend("router", "default-route=true"));
        assert_eq!(
            ids(&backends.candidates("10.250.0.5:10250")),
            ["node-a", "router"]
        );
        assert_eq!(
            ids(&backends.candidates("node-a:10250")),
            ["node-a", "router"]
        );
        assert_eq!(
            ids(&backends.candidates("10.96.0.10:53")),
            ["node-b", "router"]
        );
        assert_eq!(ids(&backends.candidates("192.0.2.1:80")), ["router"]);
        backends.all()[0].draining.store(true, Ordering::Relaxed);
        assert_eq!(
            ids(&backends.candidates("10.250.0.5:10250")),
            ["router", "node-a"]
        );
        let only_default = Backends::new(vec![Strategy::Default]);
        assert!(only_default.candidates("x:1").is_empty());
    }

    #[test]
    fn an_agents_first_stream_is_used_and_removal_is_per_stream() {
        let backends = Backends::new(vec![Strategy::Default]);
        let first = backend("a", "");
        let second = backend("a", "");
        backends.add(Arc::clone(&first));
        backends.add(Arc::clone(&second));
        assert_eq!(backends.candidates("x:1")[0].serial, first.serial);
        backends.remove(&first);
        assert_eq!(backends.candidates("x:1")[0].serial, second.serial);
        backends.remove(&second);
        assert_eq!(backends.streams(), 0);
    }

    #[test]
    fn split_host_handles_v6_and_missing_ports() {
        assert_eq!(split_host("10.0.0.1:443"), "10.0.0.1");
        assert_eq!(split_host("[fd00::1]:443"), "fd00::1");
        assert_eq!(split_host("fd00::1"), "fd00::1");
        assert_eq!(split_host("node"), "node");
    }
}
