//! Following the Gateway API: reflectors of `GatewayClass`, `Gateway`, `TLSRoute` (all
//! `gateway.networking.k8s.io/v1`) and `ReferenceGrant` (its most stable served version), the
//! translation ([`super::gateway_api`]) run by the watch loop beside Istio's, and the status
//! writer.
//!
//! The status writer runs on every replica but writes only while this replica holds the Lease
//! ([`super::lease`]). It compares the status the translation asks for with what each object
//! has and writes only the difference, with server-side apply on the `status` subresource as
//! [`FIELD_MANAGER`]: the GatewayClass's and the Gateways' conditions and listeners (ours
//! alone), and each TLSRoute's `status.parents`. That list is atomic in the CRD, so the writer
//! sends it whole: the other controllers' entries exactly as read, ours replaced, with the
//! `resourceVersion` read as the precondition (a concurrent change by another controller makes
//! the write fail with a conflict and it is redone from the new object). A condition keeps its
//! `lastTransitionTime` while its status stays. Each call is bounded by
//! [`lease::API_TIMEOUT`]; errors back off with jitter.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentkit::Shutdown;
use anyhow::Context as _;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::ApiResource;
use kube::runtime::reflector::{self, Store};
use kube::Client;
use prometheus::{IntCounter, IntGauge, Registry};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::gateway_api::{self, Condition, Settings, Status, GROUP};
use super::lease::{self, Elector};
use super::services::Services;
use super::watch::{reflect, strip, Metrics, Waitable};
use super::{Conflict, Kind, Object, ObjectKey};
use crate::config;

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "sni-proxy-gateway-api";
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a write's own echo is waited for before the object is compared again.
const ECHO_WAIT: Duration = Duration::from_secs(30);

/// The status writer's metrics.
#[derive(Debug, Clone)]
pub struct StatusMetrics {
    /// 1 while this replica holds the status Lease.
    pub leader: IntGauge,
    /// Status writes.
    pub writes: IntCounter,
    /// Failed status writes and Lease calls (each followed by a backed-off retry).
    pub errors: IntCounter,
}

impl StatusMetrics {
    /// Registers the writer's metrics in `registry`.
    pub fn new(registry: &Registry) -> anyhow::Result<StatusMetrics> {
        let m = StatusMetrics {
            leader: IntGauge::new(
                "sni_proxy_kubernetes_status_leader",
                "1 while this replica holds the Lease that lets it write Gateway API status.",
            )?,
            writes: IntCounter::new(
                "sni_proxy_kubernetes_status_writes_total",
                "Gateway API status writes (each one changed an object's status).",
            )?,
            errors: IntCounter::new(
                "sni_proxy_kubernetes_status_errors_total",
                "Failed Gateway API status writes and Lease calls; each is retried with backoff.",
            )?,
        };
        registry.register(Box::new(m.leader.clone()))?;
        registry.register(Box::new(m.writes.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        Ok(m)
    }
}

/// The reflectors of the Gateway API and the status writer's input.
#[allow(missing_debug_implementations)] // stores and a channel: nothing to show
pub struct GatewayApi {
    classes: Store<DynamicObject>,
    gateways: Store<DynamicObject>,
    routes: Store<DynamicObject>,
    grants: Store<DynamicObject>,
    settings: Settings,
    status: tokio::sync::watch::Sender<Option<Arc<Status>>>,
}

/// The API resources of the kinds read.
#[derive(Clone)]
struct Resources {
    class: ApiResource,
    gateway: ApiResource,
    route: ApiResource,
    grant: ApiResource,
}

impl GatewayApi {
    /// Starts the reflectors and the status writer (Lease in `namespace`).
    pub async fn start(
        client: &Client,
        settings: Settings,
        namespace: &str,
        shutdown: &Shutdown,
        metrics: &Metrics,
        wake: &Arc<Notify>,
    ) -> anyhow::Result<GatewayApi> {
        let resources = discover(client).await?;
        let watch = |kind: Kind, resource: &ApiResource| {
            let writer = reflector::store::Writer::<DynamicObject>::new(resource.clone());
            let api: Api<DynamicObject> = Api::all_with(client.clone(), resource);
            // Spec and status are read (the status writer compares); the rest need not stay.
            reflect(api, writer, strip, kind, shutdown, metrics, wake)
        };
        let (status, desired) = tokio::sync::watch::channel(None);
        let api = GatewayApi {
            classes: watch(Kind::GatewayClass, &resources.class),
            gateways: watch(Kind::ApiGateway, &resources.gateway),
            routes: watch(Kind::TlsRoute, &resources.route),
            grants: watch(Kind::ReferenceGrant, &resources.grant),
            settings: settings.clone(),
            status,
        };
        let identity = format!(
            "{}-{:08x}",
            std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| "sni-proxy".into()),
            rand::random::<u32>()
        );
        let elector = Elector::new(
            client.clone(),
            namespace,
            lease::name_for(&settings.gateway_class),
            identity,
        );
        let writer = Writer {
            client: client.clone(),
            settings,
            classes: api.classes.clone(),
            gateways: api.gateways.clone(),
            routes: api.routes.clone(),
            resources,
            pending: HashMap::new(),
            metrics: metrics.status.clone(),
        };
        shutdown.spawn(writer.run(elector, desired, shutdown.clone()));
        Ok(api)
    }

    /// The stores, to wait for their first listing.
    pub(super) fn waitables(&self) -> Vec<(Kind, Box<dyn Waitable>)> {
        vec![
            (Kind::GatewayClass, Box::new(self.classes.clone())),
            (Kind::ApiGateway, Box::new(self.gateways.clone())),
            (Kind::TlsRoute, Box::new(self.routes.clone())),
            (Kind::ReferenceGrant, Box::new(self.grants.clone())),
        ]
    }

    /// Translates the objects now, hands the status to the writer, and leaves to `earlier`
    /// routes (Istio's) the hosts they have, counting each as a conflict.
    pub fn translate(
        &self,
        services: &Services,
        earlier: &[config::Route],
        metrics: &Metrics,
    ) -> gateway_api::Translation {
        let classes = self.classes.state();
        let gateways = self.gateways.state();
        let routes = self.routes.state();
        let grants = self.grants.state();
        for (kind, n) in [
            (Kind::GatewayClass, classes.len()),
            (Kind::ApiGateway, gateways.len()),
            (Kind::TlsRoute, routes.len()),
            (Kind::ReferenceGrant, grants.len()),
        ] {
            metrics
                .objects
                .with_label_values(&[kind.as_str()])
                .set(n as i64);
        }
        let objects = gateway_api::Objects {
            classes: classes.iter().filter_map(object).collect(),
            gateways: gateways.iter().filter_map(object).collect(),
            routes: routes.iter().filter_map(object).collect(),
            grants: grants.iter().filter_map(object).collect(),
        };
        let mut t = gateway_api::translate(&self.settings, &objects, services);
        yield_hosts(&mut t, earlier);
        let status = &t.status;
        self.status.send_if_modified(|current| {
            if current.as_deref() == Some(status) {
                return false;
            }
            *current = Some(Arc::new(status.clone()));
            true
        });
        t
    }
}

/// Drops from `t`'s routes the hosts an `earlier` route has (the earlier keeps them).
fn yield_hosts(t: &mut gateway_api::Translation, earlier: &[config::Route]) {
    let taken: HashMap<&str, &str> = earlier
        .iter()
        .flat_map(|r| r.hosts.iter().map(move |h| (h.as_str(), r.name.as_str())))
        .collect();
    for route in &mut t.routes {
        let loser = route.name.clone();
        route.hosts.retain(|h| match taken.get(h.as_str()) {
            Some(winner) => {
                t.conflicts.push(Conflict {
                    host: h.clone(),
                    winner: (*winner).to_owned(),
                    loser: loser.clone(),
                });
                false
            }
            None => true,
        });
    }
    t.routes.retain(|r| !r.hosts.is_empty());
}

/// The served versions: v1 of GatewayClass, Gateway and TLSRoute (TLSRoute is v1 since
/// Gateway API v1.5), ReferenceGrant at its most stable.
async fn discover(client: &Client) -> anyhow::Result<Resources> {
    let group = kube::discovery::group(client, GROUP)
        .await
        .with_context(|| {
            format!("kubernetes: {GROUP} is not served (are the Gateway API CRDs installed?)")
        })?;
    let v1 = group.versioned_resources("v1");
    let find = |kind: &str| {
        v1.iter()
            .find(|(r, _)| r.kind == kind)
            .map(|(r, _)| r.clone())
            .with_context(|| {
                format!("kubernetes: {GROUP}/v1 {kind} is not served (Gateway API v1.5 or later is needed)")
            })
    };
    let grant = group
        .resources_by_stability()
        .into_iter()
        .find(|(r, _)| r.kind == "ReferenceGrant")
        .map(|(r, _)| r)
        .with_context(|| format!("kubernetes: {GROUP} ReferenceGrant is not served"))?;
    Ok(Resources {
        class: find("GatewayClass")?,
        gateway: find("Gateway")?,
        route: find("TLSRoute")?,
        grant,
    })
}

/// A dynamic object with its spec parsed (a cluster-scoped one has an empty namespace).
fn object<S: DeserializeOwned>(o: &Arc<DynamicObject>) -> Option<Object<S>> {
    let key = ObjectKey {
        namespace: o.metadata.namespace.clone().unwrap_or_default(),
        name: o.metadata.name.clone()?,
    };
    let created = o
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second());
    let spec = o.data.get("spec").cloned().unwrap_or_else(|| json!({}));
    Some(Object {
        key,
        created,
        spec: serde_json::from_value(spec).map_err(|e| format!("spec: {e}")),
    })
}

/// Writes the status while this replica holds the Lease.
struct Writer {
    client: Client,
    settings: Settings,
    classes: Store<DynamicObject>,
    gateways: Store<DynamicObject>,
    routes: Store<DynamicObject>,
    resources: Resources,
    /// Objects written, with the resourceVersion they had before and when: skipped until the
    /// store shows another version (the write's echo), or for [`ECHO_WAIT`].
    pending: HashMap<(Kind, ObjectKey), (String, Instant)>,
    metrics: StatusMetrics,
}

impl Writer {
    async fn run(
        mut self,
        mut elector: Elector,
        mut desired: tokio::sync::watch::Receiver<Option<Arc<Status>>>,
        shutdown: Shutdown,
    ) {
        let mut backoff = MIN_BACKOFF;
        let mut failing = false;
        let mut leading = false;
        loop {
            let mut failed = None;
            match elector.hold().await {
                Ok(true) => {
                    if !leading {
                        info!(
                            identity = elector.identity(),
                            "kubernetes: this replica writes the Gateway API status"
                        );
                        leading = true;
                    }
                    self.metrics.leader.set(1);
                    let status = desired.borrow_and_update().clone();
                    if let Some(status) = status {
                        if let Err(e) = self.write(&status).await {
                            failed = Some(format!("{e:#}"));
                        }
                    }
                }
                Ok(false) => {
                    leading = false;
                    self.metrics.leader.set(0);
                }
                Err(e) => failed = Some(e.to_string()),
            }
            let wait = match failed {
                Some(error) => {
                    self.metrics.errors.inc();
                    if !failing {
                        warn!(%error, "kubernetes: Gateway API status not written; retrying with backoff");
                        failing = true;
                    }
                    let wait = backoff.mul_f64(rand::random_range(0.5..1.5));
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
                None => {
                    if failing {
                        info!("kubernetes: Gateway API status written again");
                        failing = false;
                    }
                    backoff = MIN_BACKOFF;
                    lease::RENEW_INTERVAL
                }
            };
            let stop = if leading && !failing {
                tokio::select! {
                    changed = desired.changed() => changed.is_err(),
                    () = tokio::time::sleep(wait) => false,
                    () = shutdown.stopping() => true,
                }
            } else {
                tokio::select! {
                    () = tokio::time::sleep(wait) => false,
                    () = shutdown.stopping() => true,
                }
            };
            if stop {
                // Hand the Lease over at once instead of letting it expire.
                if leading {
                    elector.release().await;
                    self.metrics.leader.set(0);
                }
                return;
            }
        }
    }

    /// Writes every status that differs from `status`.
    async fn write(&mut self, status: &Status) -> anyhow::Result<()> {
        let now = now();
        let mut errors: Vec<anyhow::Error> = Vec::new();
        self.pending.retain(|_, (_, at)| at.elapsed() < ECHO_WAIT);
        let ours = self.settings.controller_name.clone();
        for class in self.classes.state() {
            let Some(conditions) = class
                .metadata
                .name
                .as_ref()
                .and_then(|n| status.classes.get(n))
            else {
                continue;
            };
            let existing = class.data.get("status").cloned().unwrap_or(Value::Null);
            let generation = class.metadata.generation.unwrap_or(0);
            let want = json!({"conditions": conditions_json(conditions, &existing["conditions"], generation, &now)});
            let have = json!({"conditions": project(&existing["conditions"], conditions)});
            if want == have {
                continue;
            }
            self.apply(
                Kind::GatewayClass,
                &class,
                &self.resources.class.clone(),
                want,
                false,
            )
            .await
            .unwrap_or_else(|e| errors.push(e));
        }
        for gw in self.gateways.state() {
            let Some(key) = key_of(&gw) else { continue };
            let Some(desired) = status.gateways.get(&key) else {
                continue;
            };
            let existing = gw.data.get("status").cloned().unwrap_or(Value::Null);
            let generation = gw.metadata.generation.unwrap_or(0);
            let listeners: Vec<Value> = desired
                .listeners
                .iter()
                .map(|l| {
                    let before = listener(&existing, &l.name);
                    json!({"name": l.name, "supportedKinds": l.supported_kinds, "attachedRoutes": l.attached_routes,
                           "conditions": conditions_json(&l.conditions, &before["conditions"], generation, &now)})
                })
                .collect();
            let want = json!({"conditions": conditions_json(&desired.conditions, &existing["conditions"], generation, &now), "listeners": listeners});
            let mut had: Vec<Value> = existing["listeners"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| {
                    let types = desired
                        .listeners
                        .iter()
                        .find(|d| l["name"] == d.name.as_str())
                        .map_or(&[][..], |d| &d.conditions[..]);
                    json!({"name": l["name"], "supportedKinds": l["supportedKinds"].as_array().cloned().unwrap_or_default(), "attachedRoutes": l["attachedRoutes"],
                           "conditions": project(&l["conditions"], types)})
                })
                .collect();
            had.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            let have = json!({"conditions": project(&existing["conditions"], &desired.conditions), "listeners": had});
            if json!({"conditions": want["conditions"], "listeners": listeners_sorted(&want)})
                == have
            {
                continue;
            }
            self.apply(
                Kind::ApiGateway,
                &gw,
                &self.resources.gateway.clone(),
                want,
                false,
            )
            .await
            .unwrap_or_else(|e| errors.push(e));
        }
        let none = Vec::new();
        for route in self.routes.state() {
            let Some(key) = key_of(&route) else { continue };
            let desired = status.routes.get(&key).unwrap_or(&none);
            let existing = route.data.get("status").cloned().unwrap_or(Value::Null);
            let parents: Vec<&Value> = existing["parents"]
                .as_array()
                .into_iter()
                .flatten()
                .collect();
            let (mine, others): (Vec<&Value>, Vec<&Value>) = parents
                .into_iter()
                .partition(|p| p["controllerName"].as_str() == Some(ours.as_str()));
            if mine.is_empty() && desired.is_empty() {
                continue;
            }
            let generation = route.metadata.generation.unwrap_or(0);
            let want_mine: Vec<Value> = desired
                .iter()
                .map(|p| {
                    let parent_ref = serde_json::to_value(&p.parent_ref).unwrap_or(Value::Null);
                    let before = mine
                        .iter()
                        .find(|m| m["parentRef"] == parent_ref)
                        .map_or(&Value::Null, |m| &m["conditions"]);
                    json!({"parentRef": parent_ref, "controllerName": ours, "conditions": conditions_json(&p.conditions, before, generation, &now)})
                })
                .collect();
            let had_mine: Vec<Value> = mine
                .iter()
                .map(|m| {
                    let types = desired
                        .iter()
                        .find(|p| serde_json::to_value(&p.parent_ref).ok().as_ref() == Some(&m["parentRef"]))
                        .map_or(&[][..], |p| &p.conditions[..]);
                    json!({"parentRef": m["parentRef"], "controllerName": ours, "conditions": project(&m["conditions"], types)})
                })
                .collect();
            if want_mine == had_mine {
                continue;
            }
            let mut all: Vec<Value> = others.into_iter().cloned().collect();
            all.extend(want_mine);
            self.apply(
                Kind::TlsRoute,
                &route,
                &self.resources.route.clone(),
                json!({"parents": all}),
                true,
            )
            .await
            .unwrap_or_else(|e| errors.push(e));
        }
        // Every object was tried; the first failure stands for the round.
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Server-side applies `status` to `object`'s status subresource; with `precondition`,
    /// only on the resourceVersion read (a conflict is left to the next round).
    async fn apply(
        &mut self,
        kind: Kind,
        object: &DynamicObject,
        resource: &ApiResource,
        status: Value,
        precondition: bool,
    ) -> anyhow::Result<()> {
        let Some(key) = key_of(object) else {
            return Ok(());
        };
        let version = object.metadata.resource_version.clone().unwrap_or_default();
        if let Some((v, at)) = self.pending.get(&(kind, key.clone())) {
            if *v == version && at.elapsed() < ECHO_WAIT {
                return Ok(()); // our last write is not in the store yet
            }
        }
        let mut metadata = json!({"name": key.name});
        if !key.namespace.is_empty() {
            metadata["namespace"] = json!(key.namespace);
        }
        if precondition {
            metadata["resourceVersion"] = json!(version);
        }
        let body = json!({"apiVersion": resource.api_version, "kind": resource.kind, "metadata": metadata, "status": status});
        let api: Api<DynamicObject> = if key.namespace.is_empty() {
            Api::all_with(self.client.clone(), resource)
        } else {
            Api::namespaced_with(self.client.clone(), &key.namespace, resource)
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(&body);
        let call = api.patch_status(&key.name, &params, &patch);
        match tokio::time::timeout(lease::API_TIMEOUT, call).await {
            Ok(Ok(_)) => {
                self.metrics.writes.inc();
                self.pending.insert((kind, key), (version, Instant::now()));
                Ok(())
            }
            // Changed or gone since it was read: the store brings the new object.
            Ok(Err(kube::Error::Api(s))) if s.is_conflict() || s.is_not_found() => Ok(()),
            Ok(Err(e)) => Err(e).with_context(|| format!("{} {key} status", kind.as_str())),
            Err(_) => anyhow::bail!(
                "{} {key} status: no answer within {:?}",
                kind.as_str(),
                lease::API_TIMEOUT
            ),
        }
    }
}

fn key_of(o: &DynamicObject) -> Option<ObjectKey> {
    Some(ObjectKey {
        namespace: o.metadata.namespace.clone().unwrap_or_default(),
        name: o.metadata.name.clone()?,
    })
}

/// Listeners of a status body sorted by name.
fn listeners_sorted(status: &Value) -> Vec<Value> {
    let mut ls: Vec<Value> = status["listeners"].as_array().cloned().unwrap_or_default();
    ls.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    ls
}

/// The existing status entry of listener `name`.
fn listener<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .unwrap_or(&Value::Null)
}

/// `desired` as `metav1.Condition`s, sorted by type: the transition time kept from
/// `existing` while the status is the same.
fn conditions_json(
    desired: &[Condition],
    existing: &Value,
    generation: i64,
    now: &str,
) -> Vec<Value> {
    let mut out: Vec<Value> = desired
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = existing
                .as_array()
                .and_then(|e| {
                    e.iter()
                        .find(|x| x["type"] == c.kind && x["status"] == status)
                })
                .and_then(|x| x["lastTransitionTime"].as_str())
                .unwrap_or(now);
            json!({"type": c.kind, "status": status, "reason": c.reason, "message": c.message,
                   "observedGeneration": generation, "lastTransitionTime": since})
        })
        .collect();
    out.sort_by(|a, b| a["type"].as_str().cmp(&b["type"].as_str()));
    out
}

/// The `existing` conditions of the types in `desired`, in the shape [`conditions_json`]
/// writes, sorted by type.
fn project(existing: &Value, desired: &[Condition]) -> Vec<Value> {
    let mut out: Vec<Value> = existing
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| desired.iter().any(|c| x["type"] == c.kind))
        .map(|x| {
            json!({"type": x["type"], "status": x["status"], "reason": x["reason"], "message": x["message"].as_str().unwrap_or(""),
                   "observedGeneration": x["observedGeneration"], "lastTransitionTime": x["lastTransitionTime"]})
        })
        .collect();
    out.sort_by(|a, b| a["type"].as_str().cmp(&b["type"].as_str()));
    out
}

/// Now, as a `metav1.Time` (seconds).
fn now() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn transition_times_stay_while_the_status_does() {
        let desired = [
            Condition {
                kind: "Accepted",
                status: true,
                reason: "Accepted",
                message: "attached".into(),
            },
            Condition {
                kind: "ResolvedRefs",
                status: false,
                reason: "BackendNotFound",
                message: "gone".into(),
            },
        ];
        let existing = json!([
            {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "message": "", "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "attached", "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "example.com/Other", "status": "True", "reason": "X", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ]);
        let now = "2026-02-02T00:00:00Z";
        let want = conditions_json(&desired, &existing, 2, now);
        assert_eq!(
            want[0]["lastTransitionTime"], "2026-01-01T00:00:00Z",
            "Accepted stayed True"
        );
        assert_eq!(want[1]["lastTransitionTime"], now, "ResolvedRefs changed");
        // The projection of what is there differs (generation, ResolvedRefs) ...
        assert_ne!(project(&existing, &desired), want);
        // ... and equals what was written once it is there; another controller's condition
        // is not ours to compare.
        let written = Value::Array(want.clone());
        assert_eq!(project(&written, &desired), want);
    }

    #[test]
    fn earlier_routes_keep_their_hosts() {
        let route = |name: &str, hosts: &[&str]| {
            let mut r = crate::Config::from_yaml("admin: {address: 127.0.0.1:1}\nlisteners: [{name: l, address: 127.0.0.1:2, mode: tls}]\nroutes: [{name: x, backends: [10.0.0.1:1]}]\n")
                .unwrap()
                .routes
                .remove(0);
            r.name = name.into();
            r.hosts = hosts.iter().map(|h| (*h).to_owned()).collect();
            r
        };
        let mut t = gateway_api::Translation {
            routes: vec![
                route("gateway:a/x", &["a.test", "b.test"]),
                route("gateway:a/y", &["a.test"]),
            ],
            ..Default::default()
        };
        yield_hosts(&mut t, &[route("istio:a/v", &["a.test"])]);
        assert_eq!(t.routes.len(), 1);
        assert_eq!(t.routes[0].hosts, ["b.test"]);
        assert_eq!(t.conflicts.len(), 2);
        assert_eq!(t.conflicts[0].winner, "istio:a/v");
    }
}
