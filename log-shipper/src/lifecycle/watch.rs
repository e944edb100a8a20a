//! Follows the `Cluster` resources on the API server and hands the tailer thread a snapshot
//! of every shoot's [`State`] after each change.
//!
//! The first snapshot is sent once the initial list is complete; until then the agent does
//! not read shoot namespaces' files (it would not know where their lines go). A watch that
//! fails (the API server restarts, the resource is not installed) is retried with backoff and
//! the last snapshot stays in force meanwhile: lines go where the last known state says, so a
//! shoot that woke up while the watch was down has its lines acknowledged unsent (muted, as
//! hibernated) until the watch is back, as with Gardener's plugin, whose informer is as stale.

use std::collections::HashMap;
use std::sync::Arc;

use agentkit::Shutdown;
use futures_util::StreamExt as _;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use tracing::{info, warn};

use super::{state_of, State};
use crate::metrics::Metrics;

/// The group of Gardener's extension resources.
pub const GROUP: &str = "extensions.gardener.cloud";
/// Their version.
pub const VERSION: &str = "v1alpha1";
/// The kind.
pub const KIND: &str = "Cluster";
/// Its plural.
pub const PLURAL: &str = "clusters";

/// Every shoot's state, by the name of its `Cluster` (its control-plane namespace).
pub type Snapshot = Arc<HashMap<String, State>>;

/// The resource of `Cluster` objects.
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

/// Watches the `Cluster` objects until `shutdown` stops, publishing a snapshot in `updates`
/// after the initial list and after each change of a state (the receiver sees the latest
/// only: nothing queues up). Ends early if the receiver is gone.
pub async fn run(
    client: kube::Client,
    updates: tokio::sync::watch::Sender<Option<Snapshot>>,
    shutdown: Shutdown,
    metrics: Metrics,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &resource());
    let mut events =
        std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    let mut states: HashMap<String, State> = HashMap::new();
    let mut listing: Option<HashMap<String, State>> = None;
    let mut synced = false;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = shutdown.stopping() => return,
        };
        let Some(event) = event else { return };
        let changed = match event {
            Ok(Event::Init) => {
                listing = Some(HashMap::new());
                false
            }
            Ok(Event::InitApply(object)) => {
                if let (Some(listing), Some((name, state))) =
                    (listing.as_mut(), read(&object, &metrics))
                {
                    listing.insert(name, state);
                }
                false
            }
            Ok(Event::InitDone) => {
                let listed = listing.take().unwrap_or_default();
                let changed = !synced || listed != states;
                states = listed;
                if !synced {
                    info!(clusters = states.len(), "Cluster resources listed");
                }
                synced = true;
                changed
            }
            Ok(Event::Apply(object)) => match read(&object, &metrics) {
                Some((name, state)) => states.insert(name, state) != Some(state),
                None => object
                    .metadata
                    .name
                    .as_ref()
                    .is_some_and(|name| states.remove(name).is_some()),
            },
            Ok(Event::Delete(object)) => object
                .metadata
                .name
                .as_ref()
                .is_some_and(|name| states.remove(name).is_some()),
            Err(error) => {
                metrics.cluster_watch_errors.inc();
                warn!(%error, "watching Cluster resources failed; retrying, the last states stay in force");
                false
            }
        };
        if changed && synced {
            metrics.clusters(&states);
            if updates.send(Some(Arc::new(states.clone()))).is_err() {
                return;
            }
        }
    }
}

/// The name and state of a `Cluster`; `None` (logged, counted) if it cannot be read: its
/// shoot's lines then go where an unknown shoot's go.
fn read(object: &DynamicObject, metrics: &Metrics) -> Option<(String, State)> {
    let name = object.metadata.name.clone()?;
    let mut json = serde_json::Map::new();
    json.insert(
        "metadata".into(),
        serde_json::json!({ "deletionTimestamp": object.metadata.deletion_timestamp }),
    );
    if let Some(spec) = object.data.get("spec") {
        json.insert("spec".into(), spec.clone());
    }
    match state_of(&serde_json::Value::Object(json)) {
        Ok(state) => Some((name, state)),
        Err(error) => {
            metrics.cluster_errors.inc();
            warn!(cluster = %name, %error, "Cluster resource not understood; its shoot counts as unknown");
            None
        }
    }
}
