//! Helpers for tests against the real control plane (`agentkit::testing::kube`): an admin
//! client, objects created and server-side applied from JSON, and backends in a network
//! namespace (the API server refuses loopback addresses in EndpointSlices). Included with
//! `#[path]` by the test binaries that need it, so the others do not compile it.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;

use agentkit::testing::kube::ControlPlane;
use agentkit::testing::Hosts;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The control plane and an admin client.
pub struct Cluster {
    pub control: &'static ControlPlane,
    pub client: Client,
}

impl Cluster {
    /// The shared control plane of this test binary (None after a loud SKIP).
    pub async fn shared(test: &'static str) -> Option<Cluster> {
        let control = tokio::task::spawn_blocking(move || ControlPlane::shared(test))
            .await
            .unwrap()?;
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(control.kubeconfig()).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        Some(Cluster {
            control,
            client: Client::try_from(config).unwrap(),
        })
    }

    /// The API of `object`'s kind (from its `apiVersion` and `kind`) and the object.
    pub fn api(&self, object: &serde_json::Value) -> (Api<DynamicObject>, DynamicObject) {
        sni_proxy::kube::testing::api(&self.client, object).unwrap()
    }

    pub async fn create(&self, object: serde_json::Value) {
        let (api, obj) = self.api(&object);
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("{object}: {e}"));
    }

    /// Server-side applies `object` as `manager` (creates or replaces its fields).
    pub async fn apply(&self, manager: &str, object: serde_json::Value) {
        let (api, obj) = self.api(&object);
        let name = obj.metadata.name.clone().unwrap();
        api.patch(
            &name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("{object}: {e}"));
    }

    /// Server-side applies `object`'s status as `manager`.
    pub async fn apply_status(&self, manager: &str, object: serde_json::Value) {
        let (api, obj) = self.api(&object);
        let name = obj.metadata.name.clone().unwrap();
        api.patch_status(
            &name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|e| panic!("{object}: {e}"));
    }

    /// The object named like `object` (apiVersion, kind, metadata.namespace and name), as
    /// JSON.
    pub async fn get(&self, object: serde_json::Value) -> serde_json::Value {
        let (api, obj) = self.api(&object);
        let got = api
            .get(obj.metadata.name.as_deref().unwrap())
            .await
            .unwrap();
        serde_json::to_value(got).unwrap()
    }
}

/// The backends' network namespace (agentkit's [`Hosts`]), and what the tests serve there.
pub struct Backends(pub Hosts);

impl Backends {
    /// A fresh namespace (None after a loud SKIP when unprivileged).
    pub fn create(test: &str) -> Option<Backends> {
        Hosts::create(test, "sngw").map(Backends)
    }

    pub fn ip(&self, host: u8) -> String {
        self.0.ip(host)
    }

    /// A backend at `<prefix>.<host>:6443` that answers every read with `name` and a newline.
    pub fn serve(&self, host: u8, name: &'static str) -> SocketAddr {
        let addr: SocketAddr = format!("{}:6443", self.ip(host)).parse().unwrap();
        let listener = self
            .0
            .netns
            .run(move || std::net::TcpListener::bind(addr).unwrap());
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }
}
