//! A shoot's lifecycle state, read from its `Cluster` resource, and where its lines go in
//! each state; without IO ([`watch`] follows the resources).
//!
//! Gardener writes one `Cluster` (`extensions.gardener.cloud/v1alpha1`, cluster-scoped) per
//! shoot, named like the shoot's control-plane namespace, with the `Shoot` object embedded in
//! `spec.shoot`. The state is decided as Gardener's logging output plugin does, first match
//! wins: testing (`spec.purpose: testing`, a shoot Gardener gives no logging stack) → deletion (a deletion timestamp) → migration (the `gardener.cloud/operation: migrate`
//! annotation or a `Migrate` last operation) → restore (a `Restore` last operation not yet
//! succeeded) → creation (no last operation, or a `Create` not yet succeeded) → hibernated /
//! hibernating / waking (`spec.hibernation.enabled` and `status.isHibernated`) → ready.
//!
//! [`Routing`] maps a state to the stores its lines go to. Its default is Gardener's: only
//! a ready shoot's lines stay out of the seed's store; creation, deletion, restore, migration
//! (and waking, which Gardener leaves unlisted: the shoot's store may not be up yet) go to
//! both; a hibernating or hibernated shoot's go nowhere (its control plane is being scaled
//! down), nor do a testing shoot's (it has no store; Gardener's plugin makes it no client). The `kubernetes.routing` setting overrides it per state.

pub mod watch;

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// The annotation of a shoot operation, and its value when the shoot is to migrate.
pub const OPERATION_ANNOTATION: &str = "gardener.cloud/operation";
/// [`OPERATION_ANNOTATION`]'s value of a migration.
pub const OPERATION_MIGRATE: &str = "migrate";

/// A shoot's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Being created (no last operation, or its `Create` has not succeeded yet).
    Creation,
    /// Running.
    Ready,
    /// Hibernation asked for, not reached yet.
    Hibernating,
    /// Hibernated: no control plane runs.
    Hibernated,
    /// Waking up from hibernation.
    Waking,
    /// Being deleted.
    Deletion,
    /// Migrating to another seed.
    Migration,
    /// Being restored on this seed after a migration.
    Restore,
    /// A shoot of purpose `testing`, in any state: Gardener gives it no logging stack.
    Testing,
}

impl State {
    /// Every state, in the order of [`Routing`]'s table.
    pub const ALL: [State; 9] = [
        State::Creation,
        State::Ready,
        State::Hibernating,
        State::Hibernated,
        State::Waking,
        State::Deletion,
        State::Migration,
        State::Restore,
        State::Testing,
    ];

    /// The lowercase name, as in the config and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creation => "creation",
            State::Ready => "ready",
            State::Hibernating => "hibernating",
            State::Hibernated => "hibernated",
            State::Waking => "waking",
            State::Deletion => "deletion",
            State::Migration => "migration",
            State::Restore => "restore",
            State::Testing => "testing",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stores a line goes to: a set of at most two, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Stores(u8);

impl Stores {
    /// No store: the line is acknowledged without being sent.
    pub const NONE: Stores = Stores(0);
    /// The shoot's own store.
    pub const SHOOT: Stores = Stores(1);
    /// The seed's (operator's) store.
    pub const SEED: Stores = Stores(2);
    /// Both.
    pub const BOTH: Stores = Stores(3);

    /// Whether `other`'s stores are all in this set.
    pub fn contains(self, other: Stores) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// The set without `other`'s stores.
    pub fn without(self, other: Stores) -> Stores {
        Stores(self.0 & !other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `shoot`, `seed`, `shoot+seed` or `none`.
    pub fn as_str(self) -> &'static str {
        match self.0 {
            0 => "none",
            1 => "shoot",
            2 => "seed",
            _ => "shoot+seed",
        }
    }
}

impl std::ops::BitOr for Stores {
    type Output = Stores;
    fn bitor(self, other: Stores) -> Stores {
        Stores(self.0 | other.0)
    }
}

/// Where a shoot's lines go in each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing([Stores; 9]);

impl Default for Routing {
    fn default() -> Routing {
        let mut table = [Stores::BOTH; 9];
        table[State::Ready.index()] = Stores::SHOOT;
        table[State::Hibernating.index()] = Stores::NONE;
        table[State::Hibernated.index()] = Stores::NONE;
        table[State::Testing.index()] = Stores::NONE;
        Routing(table)
    }
}

impl Routing {
    /// The stores of a shoot in `state`.
    pub fn get(&self, state: State) -> Stores {
        self.0[state.index()]
    }

    /// Sets the stores of `state`.
    pub fn set(&mut self, state: State, stores: Stores) {
        self.0[state.index()] = stores;
    }
}

/// Why a `Cluster` object could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// `spec.shoot` is missing or not an object.
    #[error("spec.shoot is missing or not an object")]
    NoShoot,
    /// A field has the wrong type.
    #[error("{0} has the wrong type")]
    Field(&'static str),
}

/// The state of the shoot of a `Cluster` object (its JSON, metadata and spec).
pub fn state_of(cluster: &Value) -> Result<State, ClusterError> {
    let shoot = cluster
        .pointer("/spec/shoot")
        .filter(|s| s.is_object())
        .ok_or(ClusterError::NoShoot)?;
    let deleting = |object: &Value| {
        object
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|t| !t.is_null())
    };
    let purpose = string(shoot, "/spec/purpose", "spec.shoot.spec.purpose")?;
    if purpose == Some("testing") {
        return Ok(State::Testing);
    }
    if deleting(cluster) || deleting(shoot) {
        return Ok(State::Deletion);
    }
    let operation = string(
        shoot,
        "/metadata/annotations/gardener.cloud~1operation",
        "spec.shoot.metadata.annotations",
    )?;
    let last_type = string(
        shoot,
        "/status/lastOperation/type",
        "spec.shoot.status.lastOperation.type",
    )?;
    let last_state = string(
        shoot,
        "/status/lastOperation/state",
        "spec.shoot.status.lastOperation.state",
    )?;
    let succeeded = last_state == Some("Succeeded");
    if operation == Some(OPERATION_MIGRATE) || last_type == Some("Migrate") {
        return Ok(State::Migration);
    }
    if last_type == Some("Restore") && !succeeded {
        return Ok(State::Restore);
    }
    if last_type.is_none() || (last_type == Some("Create") && !succeeded) {
        return Ok(State::Creation);
    }
    let enabled = boolean(
        shoot,
        "/spec/hibernation/enabled",
        "spec.shoot.spec.hibernation.enabled",
    )?;
    let hibernated = boolean(
        shoot,
        "/status/isHibernated",
        "spec.shoot.status.isHibernated",
    )?;
    Ok(match (enabled, hibernated) {
        (true, true) => State::Hibernated,
        (true, false) => State::Hibernating,
        (false, true) => State::Waking,
        (false, false) => State::Ready,
    })
}

fn string<'a>(
    object: &'a Value,
    pointer: &str,
    field: &'static str,
) -> Result<Option<&'a str>, ClusterError> {
    match object.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ClusterError::Field(field)),
    }
}

fn boolean(object: &Value, pointer: &str, field: &'static str) -> Result<bool, ClusterError> {
    match object.pointer(pointer) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ClusterError::Field(field)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn cluster(shoot: Value) -> Value {
        json!({"metadata": {"name": "shoot--core--a"}, "spec": {"shoot": shoot}})
    }

    fn reconciled(extra: Value) -> Value {
        let mut shoot = json!({
            "metadata": {"name": "a", "namespace": "garden-core"},
            "spec": {},
            "status": {"lastOperation": {"type": "Reconcile", "state": "Succeeded"}},
        });
        merge(&mut shoot, extra);
        shoot
    }

    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    fn state(shoot: Value) -> State {
        state_of(&cluster(shoot)).unwrap()
    }

    #[test]
    fn every_state() {
        assert_eq!(state(reconciled(json!({}))), State::Ready);
        assert_eq!(
            state(reconciled(
                json!({"metadata": {"deletionTimestamp": "2026-12-06T10:00:00Z"}})
            )),
            State::Deletion
        );
        // A testing shoot is one in every state, even while it is deleted.
        assert_eq!(
            state(reconciled(json!({"spec": {"purpose": "testing"}}))),
            State::Testing
        );
        assert_eq!(
            state(reconciled(json!({
                "metadata": {"deletionTimestamp": "2026-12-06T10:00:00Z"},
                "spec": {"purpose": "testing"},
            }))),
            State::Testing
        );
        assert_eq!(
            state(reconciled(json!({"spec": {"purpose": "evaluation"}}))),
            State::Ready
        );
        let mut deleted_cluster = cluster(reconciled(json!({})));
        deleted_cluster["metadata"]["deletionTimestamp"] = json!("2026-12-06T10:00:00Z");
        assert_eq!(state_of(&deleted_cluster).unwrap(), State::Deletion);
        assert_eq!(
            state(reconciled(
                json!({"metadata": {"annotations": {"gardener.cloud/operation": "migrate"}}})
            )),
            State::Migration
        );
        assert_eq!(
            state(reconciled(
                json!({"status": {"lastOperation": {"type": "Migrate", "state": "Succeeded"}}})
            )),
            State::Migration
        );
        assert_eq!(
            state(reconciled(
                json!({"status": {"lastOperation": {"type": "Restore", "state": "Processing"}}})
            )),
            State::Restore
        );
        assert_eq!(
            state(reconciled(
                json!({"status": {"lastOperation": {"type": "Restore", "state": "Succeeded"}}})
            )),
            State::Ready
        );
        assert_eq!(state(json!({"metadata": {}, "spec": {}})), State::Creation);
        assert_eq!(
            state(reconciled(
                json!({"status": {"lastOperation": {"type": "Create", "state": "Processing"}}})
            )),
            State::Creation
        );
        assert_eq!(
            state(reconciled(
                json!({"status": {"lastOperation": {"type": "Create", "state": "Succeeded"}}})
            )),
            State::Ready
        );
        assert_eq!(
            state(reconciled(
                json!({"spec": {"hibernation": {"enabled": true}}})
            )),
            State::Hibernating
        );
        assert_eq!(
            state(reconciled(
                json!({"spec": {"hibernation": {"enabled": true}}, "status": {"isHibernated": true}})
            )),
            State::Hibernated
        );
        assert_eq!(
            state(reconciled(
                json!({"spec": {"hibernation": {"enabled": false}}, "status": {"isHibernated": true}})
            )),
            State::Waking
        );
    }

    #[test]
    fn first_match_wins() {
        // A hibernated shoot being deleted is in deletion; one being created is in creation.
        let shoot = reconciled(json!({
            "metadata": {"deletionTimestamp": "2026-12-06T10:00:00Z", "annotations": {"gardener.cloud/operation": "migrate"}},
            "spec": {"hibernation": {"enabled": true}},
            "status": {"isHibernated": true},
        }));
        assert_eq!(state(shoot), State::Deletion);
        let shoot =
            json!({"spec": {"hibernation": {"enabled": true}}, "status": {"isHibernated": true}});
        assert_eq!(state(shoot), State::Creation);
    }

    #[test]
    fn bad_objects_name_the_field() {
        assert_eq!(state_of(&json!({"spec": {}})), Err(ClusterError::NoShoot));
        assert_eq!(
            state_of(&json!({"spec": {"shoot": "x"}})),
            Err(ClusterError::NoShoot)
        );
        let err = state_of(&cluster(reconciled(
            json!({"spec": {"hibernation": {"enabled": "yes"}}}),
        )));
        assert_eq!(
            err.unwrap_err().to_string(),
            "spec.shoot.spec.hibernation.enabled has the wrong type"
        );
        let err = state_of(&cluster(json!({"status": {"lastOperation": {"type": 3}}})));
        assert!(err.unwrap_err().to_string().contains("lastOperation"));
    }

    #[test]
    fn gardener_default_routing() {
        let r = Routing::default();
        let expect = [
            (State::Creation, Stores::BOTH),
            (State::Ready, Stores::SHOOT),
            (State::Hibernating, Stores::NONE),
            (State::Hibernated, Stores::NONE),
            (State::Waking, Stores::BOTH),
            (State::Deletion, Stores::BOTH),
            (State::Migration, Stores::BOTH),
            (State::Restore, Stores::BOTH),
            (State::Testing, Stores::NONE),
        ];
        for (state, stores) in expect {
            assert_eq!(r.get(state), stores, "{state}");
        }
        assert!(Stores::BOTH.contains(Stores::SEED));
        assert!(!Stores::SHOOT.contains(Stores::SEED));
        assert!(!Stores::SHOOT.contains(Stores::NONE));
        assert_eq!(Stores::BOTH.without(Stores::SEED), Stores::SHOOT);
        assert_eq!((Stores::SHOOT | Stores::SEED).as_str(), "shoot+seed");
        assert_eq!(State::ALL.map(State::index), [0, 1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
