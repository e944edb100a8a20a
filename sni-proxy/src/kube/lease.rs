//! One writer of the Gateway API status among the replicas: a `coordination.k8s.io/v1` Lease,
//! taken and renewed with the Lease's `resourceVersion` as the precondition (so two replicas
//! can never both think they took it). Every replica routes; only the holder writes status.
//!
//! Expiry is judged on this replica's own clock, as client-go's leader election does: the
//! holder's lease counts as expired once its record has not changed for `leaseDurationSeconds`
//! since this replica first saw it, whatever the holder's clock says.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;

/// How long a holder's lease lasts without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and a candidate retries).
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// The bound on each call to the API server.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The Lease name for a GatewayClass's status writer.
pub fn name_for(gateway_class: &str) -> String {
    format!("sni-proxy-status-{gateway_class}")
}

/// Why the Lease could not be read or written (the Lease is kept until it would expire).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server refused or failed.
    #[error("lease: {0}")]
    Api(#[from] kube::Error),
    /// No answer within [`API_TIMEOUT`].
    #[error("lease: the API server did not answer within {API_TIMEOUT:?}")]
    Timeout,
}

/// This replica's side of the Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// When this replica last renewed (or took) the Lease.
    renewed: Option<Instant>,
    /// The other holder's record as last seen (resourceVersion), and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl Elector {
    /// An elector for Lease `name` in `namespace`, as `identity` (unique per replica).
    pub fn new(client: Client, namespace: &str, name: String, identity: String) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            name,
            identity,
            renewed: None,
            observed: None,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether this replica holds the Lease now, renewing or taking it when due. An API error
    /// keeps a held Lease until it would have expired, then gives it up.
    pub async fn hold(&mut self) -> Result<bool, LeaseError> {
        if let Some(at) = self.renewed {
            if at.elapsed() < RENEW_INTERVAL {
                return Ok(true);
            }
        }
        let attempt = tokio::time::timeout(API_TIMEOUT, self.try_hold()).await;
        let result = match attempt {
            Ok(r) => r.map_err(LeaseError::Api),
            Err(_) => Err(LeaseError::Timeout),
        };
        match result {
            Ok(true) => {
                self.renewed = Some(Instant::now());
                Ok(true)
            }
            Ok(false) => {
                self.renewed = None;
                Ok(false)
            }
            Err(e) => {
                // Still ours while it has not expired for the others.
                if self
                    .renewed
                    .is_some_and(|at| at.elapsed() >= LEASE_DURATION - RENEW_INTERVAL)
                {
                    self.renewed = None;
                }
                Err(e)
            }
        }
    }

    /// Gives the Lease up (on shutdown) so another replica takes it without waiting for it to
    /// expire: the holder is cleared, on the resourceVersion read. Bounded; failures leave the
    /// Lease to expire.
    pub async fn release(&mut self) {
        self.renewed = None;
        let release = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(API_TIMEOUT, release).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "lease: not released; it expires"),
            Err(_) => tracing::debug!("lease: not released in time; it expires"),
        }
    }

    async fn try_hold(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let duration = LEASE_DURATION.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(false),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !mine {
            let held = spec
                .holder_identity
                .as_deref()
                .is_some_and(|h| !h.is_empty());
            let lasts = Duration::from_secs(
                spec.lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(LEASE_DURATION.as_secs()),
            );
            let first_seen = match &self.observed {
                Some((v, at)) if *v == version => *at,
                _ => {
                    let at = Instant::now();
                    self.observed = Some((version.clone(), at));
                    at
                }
            };
            if held && first_seen.elapsed() < lasts {
                return Ok(false);
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(duration);
        // The resourceVersion read above is the precondition: a replica that lost the race
        // gets a conflict.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }
}
