//! Agent authentication with the ServiceAccount token the agent sends (`authorization:
//! Bearer ...`), checked by a TokenReview against the API server with the configured audience:
//! the token must be authenticated, carry the audience and belong to
//! `system:serviceaccount:<namespace>:<service-account>`.
//!
//! Answers are cached per token for a TTL (failures for a short one), so a reconnect storm
//! of thousands of agents costs one review per token, not one per connection attempt
//! (upstream: 5k TokenReview qps at a 1 s sync interval on 5k nodes).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentkit::sync::lock;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use thiserror::Error;
use tracing::debug;

use super::AuthConfig;

/// How long a refusal is remembered (a fixed token will be retried soon).
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Tokens remembered at most; beyond it expired entries go, then everything.
const CACHE_LIMIT: usize = 100_000;

/// Why an agent's token was refused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("token not authenticated: {0}")]
    Unauthenticated(String),
    #[error("token audiences {0:?} do not include the required one")]
    Audience(Vec<String>),
    #[error("token belongs to {0}, not the agent's service account")]
    WrongUser(String),
    #[error("TokenReview failed: {0}")]
    Review(String),
}

impl AuthError {
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Unauthenticated(_) => "unauthenticated",
            AuthError::Audience(_) => "audience",
            AuthError::WrongUser(_) => "wrong_user",
            AuthError::Review(_) => "review_failed",
        }
    }
}

/// A review's answer and until when it is reused.
type Cached = (Result<(), AuthError>, Instant);

/// Checks agents' tokens.
pub struct Authenticator {
    client: kube::Client,
    config: AuthConfig,
    username: String,
    cache: Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub async fn new(config: AuthConfig) -> anyhow::Result<Authenticator> {
        let client = agentkit::kube::client(config.kubeconfig.as_deref(), "--kubeconfig").await?;
        Ok(Authenticator {
            client,
            username: format!(
                "system:serviceaccount:{}:{}",
                config.namespace, config.service_account
            ),
            config,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `token` may connect as an agent.
    pub async fn check(&self, token: &str) -> Result<(), AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let now = Instant::now();
        if let Some((answer, until)) = lock(&self.cache).get(token) {
            if *until > now {
                return answer.clone();
            }
        }
        let answer = self.review(token).await;
        let ttl = match &answer {
            Ok(()) => self.config.cache_ttl,
            // An API server outage is not remembered: the next agent asks again.
            Err(AuthError::Review(_)) => Duration::ZERO,
            Err(_) => NEGATIVE_TTL,
        };
        if !ttl.is_zero() {
            let mut cache = lock(&self.cache);
            if cache.len() >= CACHE_LIMIT {
                cache.retain(|_, (_, until)| *until > now);
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
            }
            cache.insert(token.to_owned(), (answer.clone(), now + ttl));
        }
        answer
    }

    async fn review(&self, token: &str) -> Result<(), AuthError> {
        let reviews: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.config.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        debug!(authenticated = ?status.authenticated, user = ?status.user.as_ref().and_then(|u| u.username.clone()), "TokenReview");
        if status.authenticated != Some(true) {
            return Err(AuthError::Unauthenticated(status.error.unwrap_or_default()));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.config.audience) {
            return Err(AuthError::Audience(audiences));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        if username != self.username {
            return Err(AuthError::WrongUser(username));
        }
        Ok(())
    }
}
