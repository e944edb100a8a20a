//! The Kubernetes API client config every agent that reads the API server makes the same way:
//! from a kubeconfig file when one is given, from the pod's service account otherwise.

use std::path::Path;

use anyhow::Context as _;

/// The client config of `kubeconfig`, or the in-cluster config (the pod's service account)
/// when it is `None`. `field` names the setting in errors (`kubernetes.kubeconfig`,
/// `--kubeconfig`). No request is sent.
pub async fn config(kubeconfig: Option<&Path>, field: &str) -> anyhow::Result<kube::Config> {
    match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("{field} {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("{field} {}", path.display()))
        }
        None => kube::Config::incluster()
            .with_context(|| format!("no {field} given and not in a pod (in-cluster config)")),
    }
}

/// A client of [`config`]'s config.
pub async fn client(kubeconfig: Option<&Path>, field: &str) -> anyhow::Result<kube::Client> {
    kube::Client::try_from(config(kubeconfig, field).await?).context("Kubernetes API client")
}
