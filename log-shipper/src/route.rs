//! Routing, without IO: which store a file's lines go to, and the labels of their stream.
//!
//! As Gardener's Fluent Bit output plugin does (`DynamicHostPath` on the namespace): a pod in
//! a shoot control-plane namespace, `shoot--<project>--<name>`, logs to that shoot's store,
//! whose URL (and tenant) is the `stores.shoot` template with `{namespace}` filled in; every
//! other namespace logs to the seed's store. With the `kubernetes:` setting, the shoot's
//! lifecycle state (from its `Cluster`, see [`lifecycle`](crate::lifecycle)) decides whether a
//! shoot's lines go to its store, the seed's, both or neither; a shoot namespace without a
//! `Cluster` (its shoot is gone) logs to the seed's store, as Gardener sends a deleted
//! cluster's lines to its default client. Without the setting every shoot counts as ready: its
//! own store only. Separate from the agent's loop so that the rule is tested on its own.
//!
//! Labels are the ones Gardener's dashboards and queries use (its `LabelMapPath` and static
//! labels): `namespace_name`, `pod_name`, `container_name` from the file's path,
//! `origin="seed"`, and `nodename` when the node's name is known. The CRI stream (stdout, stderr) is not a label, as in Gardener (its
//! `RemoveKeys` drops `stream`). Streams are thus one per container of a pod on this node:
//! bounded by what the kubelet runs, never by the content of a line.

use std::sync::Arc;

use crate::config::{Store, Template};
use crate::lifecycle::watch::Snapshot;
use crate::lifecycle::{Routing, Stores};
use crate::loki;
use crate::tail::path::Container;
use crate::FastMap;

/// The prefix of a shoot control-plane namespace.
pub const SHOOT_PREFIX: &str = "shoot--";
/// The `origin` label's value on every stream this agent sends (Gardener's seed output).
pub const ORIGIN: &str = "seed";
/// The most label strings kept in the cache; past it, it is cleared (a node runs far fewer
/// containers, so this only bounds memory after a long churn of pods).
pub const MAX_CACHED_LABELS: usize = 16 * 1024;

/// Where a file's lines go.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// The seed's store.
    Seed,
    /// The store of the shoot whose control plane runs in this namespace.
    Shoot(Arc<str>),
}

impl Target {
    /// `seed` or `shoot`: the bounded `store` label of the metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Seed => "seed",
            Target::Shoot(_) => "shoot",
        }
    }
}

/// Whether `namespace` is a shoot control-plane namespace, `shoot--<project>--<name>`, with
/// only the characters of a DNS label (so that it is safe to put in a URL).
pub fn is_shoot_namespace(namespace: &str) -> bool {
    let Some(rest) = namespace.strip_prefix(SHOOT_PREFIX) else {
        return false;
    };
    let Some((project, name)) = rest.split_once("--") else {
        return false;
    };
    !project.is_empty()
        && !name.is_empty()
        && namespace.len() <= 63
        && namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !namespace.ends_with('-')
}

/// The target of a namespace's lines.
pub fn target(namespace: &str) -> Target {
    if is_shoot_namespace(namespace) {
        Target::Shoot(namespace.into())
    } else {
        Target::Seed
    }
}

/// A store's rendered URL and tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The push URL.
    pub url: String,
    /// The tenant header's value, if any.
    pub tenant: Option<String>,
}

/// The endpoint of `target`: the seed store as written, a shoot's with `{namespace}` filled.
pub fn endpoint(target: &Target, seed: &Store, shoot: &Store) -> Endpoint {
    let render = |t: &Template, ns: &str| t.render(ns);
    match target {
        Target::Seed => Endpoint {
            url: seed.url.as_str().to_owned(),
            tenant: seed.tenant.as_ref().map(|t| t.as_str().to_owned()),
        },
        Target::Shoot(ns) => Endpoint {
            url: render(&shoot.url, ns),
            tenant: shoot.tenant.as_ref().map(|t| render(t, ns)),
        },
    }
}

/// The stream labels of a container's lines on node `node`, in Loki's selector syntax.
pub fn labels(container: &Container, node: Option<&str>) -> String {
    let mut labels = vec![
        ("origin", ORIGIN),
        ("namespace_name", &*container.namespace),
        ("pod_name", &*container.pod),
        ("container_name", &*container.container),
    ];
    if let Some(node) = node {
        labels.push(("nodename", node));
    }
    loki::format_labels(&labels)
        // The names are valid constants and `origin` is never empty, so this cannot fail; a
        // fallback keeps the type simple.
        .unwrap_or_else(|_| format!("{{origin=\"{ORIGIN}\"}}"))
}

/// Where a container's lines go and their stream labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The stores: [`Stores::SEED`] is the seed's, [`Stores::SHOOT`] the namespace's own.
    pub stores: Stores,
    /// The shoot namespace's store, for a shoot namespace.
    pub shoot: Option<Target>,
    /// The stream labels.
    pub labels: Arc<str>,
}

/// What the router knows of the shoots' lifecycle.
#[derive(Debug, Clone)]
pub enum Lifecycle {
    /// Not followed (no `kubernetes:` setting), or not listed in time: every shoot is ready.
    EveryShootReady,
    /// Followed, not listed yet: shoot namespaces wait.
    Waiting,
    /// The states of the listed shoots.
    Known(Snapshot),
}

/// A container's route, computed once per container and again after a lifecycle change.
#[derive(Debug)]
pub struct Router {
    cache: FastMap<Arc<Container>, Route>,
    /// The last container routed: lines come in runs of one file, whose container is one
    /// `Arc`, so most lookups end here without hashing the container's names.
    last: Option<(Arc<Container>, Route)>,
    lifecycle: Lifecycle,
    routing: Routing,
    node: Option<String>,
}

impl Router {
    /// A router of `lifecycle`, sending each state's lines where `routing` says, labelling
    /// them with `node`'s name if given.
    pub fn new(lifecycle: Lifecycle, routing: Routing, node: Option<String>) -> Router {
        Router {
            cache: FastMap::default(),
            last: None,
            lifecycle,
            routing,
            node,
        }
    }

    /// Replaces what is known of the shoots' lifecycle.
    pub fn set_lifecycle(&mut self, lifecycle: Lifecycle) {
        self.lifecycle = lifecycle;
        self.cache.clear();
        self.last = None;
    }

    /// Whether lines of `namespace` must wait: a shoot namespace before the shoots are
    /// listed.
    pub fn waits(&self, namespace: &str) -> bool {
        matches!(self.lifecycle, Lifecycle::Waiting) && is_shoot_namespace(namespace)
    }

    /// Whether the shoots are listed (or not followed).
    pub fn is_waiting(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Waiting)
    }

    /// The stores of `namespace`'s lines.
    pub fn stores(&self, namespace: &str) -> Stores {
        if !is_shoot_namespace(namespace) {
            return Stores::SEED;
        }
        match &self.lifecycle {
            Lifecycle::EveryShootReady | Lifecycle::Waiting => Stores::SHOOT,
            Lifecycle::Known(states) => match states.get(namespace) {
                Some(state) => self.routing.get(*state),
                None => Stores::SEED,
            },
        }
    }

    /// The route of `container`'s lines.
    pub fn route(&mut self, container: &Arc<Container>) -> Route {
        if let Some((last, route)) = &self.last {
            if Arc::ptr_eq(last, container) {
                return route.clone();
            }
        }
        let routed = match self.cache.get(container) {
            Some(hit) => hit.clone(),
            None => {
                if self.cache.len() >= MAX_CACHED_LABELS {
                    self.cache.clear();
                }
                let shoot = match target(&container.namespace) {
                    Target::Seed => None,
                    shoot => Some(shoot),
                };
                let routed = Route {
                    stores: self.stores(&container.namespace),
                    shoot,
                    labels: Arc::from(labels(container, self.node.as_deref())),
                };
                self.cache.insert(container.clone(), routed.clone());
                routed
            }
        };
        self.last = Some((container.clone(), routed.clone()));
        routed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Config;
    use std::collections::HashMap;

    fn container(ns: &str) -> Arc<Container> {
        Arc::new(Container {
            namespace: ns.into(),
            pod: "kube-apiserver-7d9f".into(),
            uid: "0a1b".into(),
            container: "kube-apiserver".into(),
        })
    }

    #[test]
    fn shoot_namespaces() {
        assert!(is_shoot_namespace("shoot--core--aws-01"));
        assert!(is_shoot_namespace("shoot--p--n"));
        assert!(is_shoot_namespace("shoot--garden--a--b"));
        for ns in [
            "garden",
            "kube-system",
            "shoot--",
            "shoot--core",
            "shoot--core--",
            "shoot----name",
            "shoot-core-name",
            "shoot--Core--name",
            "shoot--core--na/me",
            "shoot--core--name-",
            "xshoot--core--name",
        ] {
            assert!(!is_shoot_namespace(ns), "{ns}");
            assert_eq!(target(ns), Target::Seed, "{ns}");
        }
        assert_eq!(
            target("shoot--core--aws-01"),
            Target::Shoot("shoot--core--aws-01".into())
        );
    }

    #[test]
    fn endpoints_of_the_example() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/example.yaml")).unwrap();
        let config = Config::from_yaml(&text).unwrap();
        assert_eq!(
            endpoint(&Target::Seed, &config.seed, &config.shoot).url,
            "http://logging.garden.svc:3100/vali/api/v1/push"
        );
        let shoot = target("shoot--core--aws-01");
        assert_eq!(
            endpoint(&shoot, &config.seed, &config.shoot),
            Endpoint {
                url: "http://logging.shoot--core--aws-01.svc:3100/vali/api/v1/push".into(),
                tenant: None
            }
        );
        assert_eq!(shoot.kind(), "shoot");
        assert_eq!(Target::Seed.kind(), "seed");
    }

    #[test]
    fn gardener_labels() {
        assert_eq!(
            labels(&container("shoot--core--aws-01"), None),
            r#"{container_name="kube-apiserver", namespace_name="shoot--core--aws-01", origin="seed", pod_name="kube-apiserver-7d9f"}"#
        );
        assert_eq!(
            labels(
                &container("garden"),
                Some("ip-10-0-1-2.eu-west-1.compute.internal")
            ),
            r#"{container_name="kube-apiserver", namespace_name="garden", nodename="ip-10-0-1-2.eu-west-1.compute.internal", origin="seed", pod_name="kube-apiserver-7d9f"}"#
        );
    }

    #[test]
    fn router_caches_per_container() {
        let mut router = Router::new(Lifecycle::EveryShootReady, Routing::default(), None);
        let c = container("garden");
        let r1 = router.route(&c);
        let r2 = router.route(&container("garden"));
        assert_eq!((r1.stores, &r1.shoot), (Stores::SEED, &None));
        assert_eq!(r1, r2);
        assert!(Arc::ptr_eq(&r1.labels, &r2.labels));
        let r3 = router.route(&container("shoot--a--b"));
        assert_eq!(r3.shoot, Some(Target::Shoot("shoot--a--b".into())));
        assert_eq!(r3.stores, Stores::SHOOT);
        assert_eq!(router.cache.len(), 2);
    }

    #[test]
    fn router_follows_the_lifecycle() {
        use crate::lifecycle::State;
        let mut router = Router::new(Lifecycle::Waiting, Routing::default(), None);
        assert!(router.waits("shoot--a--b"));
        assert!(!router.waits("garden"));
        assert_eq!(router.route(&container("garden")).stores, Stores::SEED);
        let states: HashMap<String, State> = [
            ("shoot--a--ready".to_owned(), State::Ready),
            ("shoot--a--new".to_owned(), State::Creation),
            ("shoot--a--asleep".to_owned(), State::Hibernated),
        ]
        .into();
        router.set_lifecycle(Lifecycle::Known(Arc::new(states)));
        assert!(!router.waits("shoot--a--b"));
        for (ns, stores) in [
            ("shoot--a--ready", Stores::SHOOT),
            ("shoot--a--new", Stores::BOTH),
            ("shoot--a--asleep", Stores::NONE),
            ("shoot--a--gone", Stores::SEED),
            ("garden", Stores::SEED),
        ] {
            assert_eq!(router.route(&container(ns)).stores, stores, "{ns}");
        }
        // A change of state reaches the cached containers.
        router.set_lifecycle(Lifecycle::Known(Arc::new(
            [("shoot--a--asleep".to_owned(), State::Waking)].into(),
        )));
        assert_eq!(
            router.route(&container("shoot--a--asleep")).stores,
            Stores::BOTH
        );
        assert_eq!(
            router.route(&container("shoot--a--ready")).stores,
            Stores::SEED
        );
    }
}
