//! Routing, without IO: which store a file's lines go to, and the labels of their stream.
//!
//! As Gardener's Fluent Bit output plugin does (`DynamicHostPath` on the namespace): a pod in
//! a shoot control-plane namespace, `shoot--<project>--<name>`, logs to that shoot's store,
//! whose URL (and tenant) is the `stores.shoot` template with `{namespace}` filled in; every
//! other namespace logs to the seed's store. The shoot's lifecycle (`Cluster` resources) is not
//! followed yet: every shoot counts as ready, and a ready shoot's lines go to its own store
//! only (Gardener's default for `ready`). Separate from the agent's loop so that the rule is
//! tested on its own.
//!
//! Labels are the ones Gardener's dashboards and queries use (its `LabelMapPath` and static
//! labels): `namespace_name`, `pod_name`, `container_name` from the file's path, and
//! `origin="seed"`. The CRI stream (stdout, stderr) is not a label, as in Gardener (its
//! `RemoveKeys` drops `stream`). Streams are thus one per container of a pod on this node:
//! bounded by what the kubelet runs, never by the content of a line.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Store, Template};
use crate::loki;
use crate::tail::path::Container;

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

/// The stream labels of a container's lines, in Loki's selector syntax.
pub fn labels(container: &Container) -> String {
    loki::format_labels(&[
        ("origin", ORIGIN),
        ("namespace_name", &container.namespace),
        ("pod_name", &container.pod),
        ("container_name", &container.container),
    ])
    // The names are valid constants and `origin` is never empty, so this cannot fail; a
    // fallback keeps the type simple.
    .unwrap_or_else(|_| format!("{{origin=\"{ORIGIN}\"}}"))
}

/// A container's target and labels, computed once per container.
#[derive(Debug, Default)]
pub struct Router {
    cache: HashMap<Arc<Container>, (Target, Arc<str>)>,
}

impl Router {
    /// An empty router.
    pub fn new() -> Router {
        Router::default()
    }

    /// The target and labels of `container`'s lines.
    pub fn route(&mut self, container: &Arc<Container>) -> (Target, Arc<str>) {
        if let Some(hit) = self.cache.get(container) {
            return hit.clone();
        }
        if self.cache.len() >= MAX_CACHED_LABELS {
            self.cache.clear();
        }
        let routed = (target(&container.namespace), Arc::from(labels(container)));
        self.cache.insert(container.clone(), routed.clone());
        routed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Config;

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
            labels(&container("shoot--core--aws-01")),
            r#"{container_name="kube-apiserver", namespace_name="shoot--core--aws-01", origin="seed", pod_name="kube-apiserver-7d9f"}"#
        );
    }

    #[test]
    fn router_caches_per_container() {
        let mut router = Router::new();
        let c = container("garden");
        let (t1, l1) = router.route(&c);
        let (t2, l2) = router.route(&container("garden"));
        assert_eq!(t1, Target::Seed);
        assert_eq!(t1, t2);
        assert!(Arc::ptr_eq(&l1, &l2));
        let (t3, _) = router.route(&container("shoot--a--b"));
        assert_eq!(t3, Target::Shoot("shoot--a--b".into()));
        assert_eq!(router.cache.len(), 2);
    }
}
