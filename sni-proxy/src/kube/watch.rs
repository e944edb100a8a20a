//! Following the API server: one reflector per kind (kube-rs's watcher: list, then watch,
//! relist on `410 Gone`, back off with jitter on errors), each keeping a store that is swapped
//! whole when a relist completes. Every change wakes the translator, which waits a moment for
//! the rest of a burst, reads every store, translates, and hands the result to the proxy when
//! it differs from the last. While the API server is away the stores keep what they had, so
//! the routes stay as they were: a watch error never empties the table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentkit::Shutdown;
use anyhow::Context as _;
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::gateway_watch::{GatewayApi, StatusMetrics};
use super::services::Services;
use super::{connect, istio, objects, Conflict, Kind, Object, ObjectKey, Reason, Skip};
use crate::config;

/// How long the translator waits after a change for the rest of its burst (a shoot's objects
/// arrive one by one).
pub const COALESCE: Duration = Duration::from_millis(20);
/// Istio's API group.
pub const ISTIO_GROUP: &str = "networking.istio.io";

/// The metrics of the Kubernetes source.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// 1 once every kind has been listed.
    pub synced: IntGauge,
    /// Unix time of the last translation handed to the proxy.
    pub last_sync: IntGauge,
    /// Objects in the stores, by kind.
    pub objects: IntGaugeVec,
    /// What is not served now, by kind and reason.
    pub skipped: IntGaugeVec,
    /// SNI hosts claimed twice now.
    pub conflicts: IntGauge,
    /// Routes from Kubernetes now.
    pub routes: IntGauge,
    /// Watch errors by kind (each followed by a backed-off retry).
    pub watch_errors: IntCounterVec,
    /// Time from reading the stores to the new table in place, per change.
    pub translation: Histogram,
    /// The Gateway API status writer's.
    pub status: StatusMetrics,
}

impl Metrics {
    /// Registers the source's metrics in `registry`.
    pub fn new(registry: &Registry) -> anyhow::Result<Metrics> {
        let m = Metrics {
            synced: IntGauge::new(
                "sni_proxy_kubernetes_synced",
                "1 once every watched kind has been listed from the API server.",
            )?,
            last_sync: IntGauge::new(
                "sni_proxy_kubernetes_last_sync_timestamp_seconds",
                "Unix time of the last routes taken from the API server.",
            )?,
            objects: IntGaugeVec::new(
                Opts::new("sni_proxy_kubernetes_objects", "Objects watched, by kind."),
                &["kind"],
            )?,
            skipped: IntGaugeVec::new(
                Opts::new(
                    "sni_proxy_kubernetes_skipped",
                    "Objects (or parts) not served, by kind and reason.",
                ),
                &["kind", "reason"],
            )?,
            conflicts: IntGauge::new(
                "sni_proxy_kubernetes_conflicts",
                "SNI hosts claimed by two routes (the oldest keeps them).",
            )?,
            routes: IntGauge::new(
                "sni_proxy_kubernetes_routes",
                "Routes taken from the API server.",
            )?,
            watch_errors: IntCounterVec::new(
                Opts::new(
                    "sni_proxy_kubernetes_watch_errors_total",
                    "Watch errors by kind; each is retried with backoff.",
                ),
                &["kind"],
            )?,
            translation: Histogram::with_opts(
                HistogramOpts::new(
                    "sni_proxy_kubernetes_translation_seconds",
                    "Time from reading the watched objects to the new route table in place, per change.",
                )
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
            )?,
            status: StatusMetrics::new(registry)?,
        };
        registry.register(Box::new(m.synced.clone()))?;
        registry.register(Box::new(m.last_sync.clone()))?;
        registry.register(Box::new(m.objects.clone()))?;
        registry.register(Box::new(m.skipped.clone()))?;
        registry.register(Box::new(m.conflicts.clone()))?;
        registry.register(Box::new(m.routes.clone()))?;
        registry.register(Box::new(m.watch_errors.clone()))?;
        registry.register(Box::new(m.translation.clone()))?;
        for kind in Kind::ALL {
            m.objects.with_label_values(&[kind.as_str()]).set(0);
        }
        Ok(m)
    }
}

/// One translation of everything watched.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The routes, sorted by name.
    pub routes: Vec<config::Route>,
    /// What is not served.
    pub skips: Vec<Skip>,
    /// SNI hosts claimed twice.
    pub conflicts: Vec<Conflict>,
}

/// A connected source: the client and what it serves.
#[derive(Clone)]
pub struct Source {
    client: Client,
    settings: config::Kubernetes,
    namespace: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Source {
    /// Reads the kubeconfig (or the pod's service account) and makes the client; no request
    /// is sent yet.
    pub async fn connect(settings: &config::Kubernetes) -> anyhow::Result<Source> {
        let config =
            agentkit::kube::config(settings.kubeconfig.as_deref(), "kubernetes.kubeconfig").await?;
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).context("kubernetes: client")?;
        Ok(Source {
            client,
            settings: settings.clone(),
            namespace,
        })
    }

    /// Watches until `shutdown` stops, calling `apply` with each translation that differs
    /// from the last (the first once every kind has been listed).
    pub async fn run(
        self,
        shutdown: Shutdown,
        metrics: Metrics,
        mut apply: impl FnMut(Update) + Send,
    ) -> anyhow::Result<()> {
        let wake = Arc::new(Notify::new());
        let services = self.watch_typed::<Service>(Kind::Service, &shutdown, &metrics, &wake);
        let slices =
            self.watch_typed::<EndpointSlice>(Kind::EndpointSlice, &shutdown, &metrics, &wake);
        let mut istio = match &self.settings.istio_selector {
            Some(selector) => Some(
                self.watch_istio(selector.clone(), &shutdown, &metrics, &wake)
                    .await?,
            ),
            None => None,
        };
        let gateway_api = match &self.settings.gateway_api {
            Some(settings) => Some(
                GatewayApi::start(
                    &self.client,
                    settings.clone(),
                    &self.namespace,
                    &shutdown,
                    &metrics,
                    &wake,
                )
                .await?,
            ),
            None => None,
        };
        let mut stores: Vec<(Kind, Box<dyn Waitable>)> = vec![
            (Kind::Service, Box::new(services.clone())),
            (Kind::EndpointSlice, Box::new(slices.clone())),
        ];
        if let Some(i) = &istio {
            stores.push((Kind::Gateway, Box::new(i.gateways.clone())));
            stores.push((Kind::VirtualService, Box::new(i.virtual_services.clone())));
            stores.push((Kind::DestinationRule, Box::new(i.destination_rules.clone())));
        }
        if let Some(g) = &gateway_api {
            stores.extend(g.waitables());
        }
        for (kind, store) in &stores {
            tokio::select! {
                ready = store.ready() => ready.with_context(|| format!("kubernetes: the {} watch ended", kind.as_str()))?,
                () = shutdown.stopping() => return Ok(()),
            }
        }
        metrics.synced.set(1);
        info!(namespace = %self.namespace, "kubernetes: every kind listed");
        let mut last: Option<Update> = None;
        let mut reported: HashSet<Skip> = HashSet::new();
        loop {
            let translating = Instant::now();
            let update = {
                let services_now = Services::new(&services.state(), &slices.state());
                let mut routes = Vec::new();
                let mut skips = Vec::new();
                let mut conflicts = Vec::new();
                metrics
                    .objects
                    .with_label_values(&[Kind::Service.as_str()])
                    .set(services.len() as i64);
                metrics
                    .objects
                    .with_label_values(&[Kind::EndpointSlice.as_str()])
                    .set(slices.len() as i64);
                if let Some(i) = &mut istio {
                    let objects = i.objects(&metrics);
                    let t = istio::translate(&i.settings, &objects, &services_now);
                    routes.extend(t.routes);
                    skips.extend(t.skips);
                    conflicts.extend(t.conflicts);
                }
                if let Some(g) = &gateway_api {
                    // Istio's routes keep their hosts.
                    let t = g.translate(&services_now, &routes, &metrics);
                    routes.extend(t.routes);
                    skips.extend(t.skips);
                    conflicts.extend(t.conflicts);
                }
                routes.extend(connect::routes(&self.settings.connect_allow, &services_now));
                Update {
                    routes,
                    skips,
                    conflicts,
                }
            };
            if last.as_ref() != Some(&update) {
                report(&update, &mut reported, &metrics);
                metrics.routes.set(update.routes.len() as i64);
                metrics.last_sync.set(unix_now());
                apply(update.clone());
                last = Some(update);
            }
            metrics
                .translation
                .observe(translating.elapsed().as_secs_f64());
            tokio::select! {
                () = wake.notified() => {}
                () = shutdown.stopping() => return Ok(()),
            }
            tokio::time::sleep(COALESCE).await;
        }
    }

    fn watch_typed<K>(
        &self,
        kind: Kind,
        shutdown: &Shutdown,
        metrics: &Metrics,
        wake: &Arc<Notify>,
    ) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let writer = reflector::store::Writer::default();
        let api: Api<K> = Api::all(self.client.clone());
        reflect(api, writer, strip, kind, shutdown, metrics, wake)
    }

    async fn watch_istio(
        &self,
        selector: BTreeMap<String, String>,
        shutdown: &Shutdown,
        metrics: &Metrics,
        wake: &Arc<Notify>,
    ) -> anyhow::Result<IstioStores> {
        let version = istio_version(&self.client).await?;
        let dynamic = |kind: Kind, plural: &str| {
            let gvk = GroupVersionKind::gvk(ISTIO_GROUP, &version, kind.as_str());
            let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
            let writer = reflector::store::Writer::<DynamicObject>::new(resource.clone());
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            let only_spec = |o: &mut DynamicObject| {
                strip(o);
                // Only the spec is read.
                if let Some(fields) = o.data.as_object_mut() {
                    fields.retain(|k, _| k == "spec");
                }
            };
            reflect(api, writer, only_spec, kind, shutdown, metrics, wake)
        };
        Ok(IstioStores {
            gateways: dynamic(Kind::Gateway, "gateways"),
            virtual_services: dynamic(Kind::VirtualService, "virtualservices"),
            destination_rules: dynamic(Kind::DestinationRule, "destinationrules"),
            settings: istio::Settings {
                selector,
                namespace: Some(self.namespace.clone()),
            },
            parsed: Parsed::default(),
        })
    }
}

struct IstioStores {
    gateways: Store<DynamicObject>,
    virtual_services: Store<DynamicObject>,
    destination_rules: Store<DynamicObject>,
    settings: istio::Settings,
    parsed: Parsed,
}

/// Specs parsed earlier, by object and resourceVersion: a change re-parses only what changed.
#[derive(Default)]
struct Parsed {
    gateways: ParseCache<objects::GatewaySpec>,
    virtual_services: ParseCache<objects::VirtualServiceSpec>,
    destination_rules: ParseCache<objects::DestinationRuleSpec>,
}

struct ParseCache<S> {
    by_key: HashMap<ObjectKey, (String, Object<S>)>,
}

impl<S> Default for ParseCache<S> {
    fn default() -> Self {
        ParseCache {
            by_key: HashMap::new(),
        }
    }
}

impl<S: DeserializeOwned + Clone> ParseCache<S> {
    /// The objects of `state`, parsed, reusing what an unchanged resourceVersion allows;
    /// objects gone from `state` are forgotten.
    fn objects(&mut self, state: &[Arc<DynamicObject>]) -> Vec<Object<S>> {
        let mut next = HashMap::with_capacity(state.len());
        let mut out = Vec::with_capacity(state.len());
        for o in state {
            let version = o.metadata.resource_version.clone().unwrap_or_default();
            let (Some(namespace), Some(name)) = (&o.metadata.namespace, &o.metadata.name) else {
                continue;
            };
            let key = ObjectKey {
                namespace: namespace.clone(),
                name: name.clone(),
            };
            let parsed = match self.by_key.remove(&key) {
                Some((v, parsed)) if v == version && !version.is_empty() => parsed,
                _ => match object(o) {
                    Some(parsed) => parsed,
                    None => continue,
                },
            };
            out.push(parsed.clone());
            next.insert(key, (version, parsed));
        }
        self.by_key = next;
        out
    }
}

impl IstioStores {
    fn objects(&mut self, metrics: &Metrics) -> istio::Objects {
        let gateways = self.gateways.state();
        let virtual_services = self.virtual_services.state();
        let destination_rules = self.destination_rules.state();
        for (kind, n) in [
            (Kind::Gateway, gateways.len()),
            (Kind::VirtualService, virtual_services.len()),
            (Kind::DestinationRule, destination_rules.len()),
        ] {
            metrics
                .objects
                .with_label_values(&[kind.as_str()])
                .set(n as i64);
        }
        istio::Objects {
            gateways: self.parsed.gateways.objects(&gateways),
            virtual_services: self.parsed.virtual_services.objects(&virtual_services),
            destination_rules: self.parsed.destination_rules.objects(&destination_rules),
        }
    }
}

/// A store that can be waited on, whatever its kind.
pub(super) trait Waitable: Send + Sync {
    fn ready(
        &self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), reflector::store::WriterDropped>>
                + Send
                + '_,
        >,
    >;
}

impl<K> Waitable for Store<K>
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    fn ready(
        &self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), reflector::store::WriterDropped>>
                + Send
                + '_,
        >,
    > {
        Box::pin(self.wait_until_ready())
    }
}

/// Drops what the stores need not keep (server-side apply's `managedFields`, kubectl's
/// last-applied copy): most of an object's size.
pub(super) fn strip<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    if let Some(annotations) = object.meta_mut().annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Keeps `writer`'s store in step with `api` on `shutdown`'s tracker: list, then watch, a relist
/// after `410 Gone`, jittered backoff on errors; `trim` drops what the store need not keep.
/// Every change wakes the translator ([`drive`]). Returns the store.
pub(super) fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    trim: impl FnMut(&mut K) + Send + 'static,
    kind: Kind,
    shutdown: &Shutdown,
    metrics: &Metrics,
    wake: &Arc<Notify>,
) -> Store<K>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let store = writer.as_reader();
    let stream = reflector::reflector(
        writer,
        watcher::watcher(api, watcher::Config::default())
            .modify(trim)
            .default_backoff(),
    );
    shutdown.spawn(drive(
        stream,
        kind,
        shutdown.clone(),
        metrics.clone(),
        Arc::clone(wake),
    ));
    store
}

/// Runs one reflector's stream: wakes the translator on every change it stores (not on the
/// single objects of a relist: its end swaps the store), counts and logs errors.
pub(super) async fn drive<K, S>(
    stream: S,
    kind: Kind,
    shutdown: Shutdown,
    metrics: Metrics,
    wake: Arc<Notify>,
) where
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    let errors = metrics.watch_errors.with_label_values(&[kind.as_str()]);
    let mut failing = false;
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            () = shutdown.stopping() => return,
        };
        match item {
            Some(Ok(Event::Init | Event::InitApply(_))) => {}
            Some(Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_))) => {
                if failing {
                    info!(kind = kind.as_str(), "kubernetes: watching again");
                    failing = false;
                }
                wake.notify_one();
            }
            Some(Err(error)) => {
                errors.inc();
                // Logged once per outage; the counter has every retry.
                if !failing {
                    warn!(kind = kind.as_str(), %error, "kubernetes: watch failed; retrying with backoff, routes unchanged");
                    failing = true;
                }
            }
            None => return,
        }
    }
}

/// Istio's served version: `v1` where it is served (Istio 1.22 and later), else `v1beta1`.
async fn istio_version(client: &Client) -> anyhow::Result<String> {
    let group = kube::discovery::group(client, ISTIO_GROUP)
        .await
        .with_context(|| {
            format!("kubernetes: {ISTIO_GROUP} is not served (are Istio's CRDs installed?)")
        })?;
    let versions: Vec<&str> = group.versions().collect();
    ["v1", "v1beta1"]
        .into_iter()
        .find(|v| versions.contains(v))
        .map(str::to_owned)
        .with_context(|| {
            format!("kubernetes: {ISTIO_GROUP} serves {versions:?}, neither v1 nor v1beta1")
        })
}

/// A dynamic object with its spec parsed into `S`.
fn object<S: DeserializeOwned>(o: &Arc<DynamicObject>) -> Option<Object<S>> {
    let key = ObjectKey {
        namespace: o.metadata.namespace.clone()?,
        name: o.metadata.name.clone()?,
    };
    let created = o
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second());
    let spec = o
        .data
        .get("spec")
        .cloned()
        .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
    Some(Object {
        key,
        created,
        spec: serde_json::from_value(spec).map_err(|e| format!("spec: {e}")),
    })
}

/// Logs each skip and conflict once (while it lasts) and sets the gauges.
fn report(update: &Update, reported: &mut HashSet<Skip>, metrics: &Metrics) {
    let now: HashSet<Skip> = update.skips.iter().cloned().collect();
    for skip in now.difference(reported) {
        warn!(kind = skip.kind.as_str(), object = %skip.key, reason = skip.reason.as_str(), detail = %skip.detail, "kubernetes: not served");
    }
    *reported = now;
    for kind in Kind::ALL {
        for reason in Reason::ALL {
            let n = update
                .skips
                .iter()
                .filter(|s| s.kind == kind && s.reason == reason)
                .count();
            if n > 0 {
                metrics
                    .skipped
                    .with_label_values(&[kind.as_str(), reason.as_str()])
                    .set(n as i64);
            } else {
                let _ = metrics
                    .skipped
                    .remove_label_values(&[kind.as_str(), reason.as_str()]);
            }
        }
    }
    for c in &update.conflicts {
        warn!(host = %c.host, winner = %c.winner, loser = %c.loser, "kubernetes: SNI host claimed twice; the older route keeps it");
    }
    metrics.conflicts.set(update.conflicts.len() as i64);
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
