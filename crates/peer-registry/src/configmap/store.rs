//! The registry object as the write loops see it: the [`Store`] calls on the
//! one named ConfigMap (over the apiserver here; `memory` has an in-memory
//! one for tests), and the [`Observer`] that decodes what they read and warns
//! once per new problem or size threshold crossed.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{GetParams, Patch, PatchParams, PostParams};
use tracing::{info, warn};

use crate::error::Result;
use crate::record::Snapshot;
use crate::schema;

/// The calls the write loops need, on the one named object.
#[async_trait::async_trait]
pub(super) trait Store: Send + Sync {
    async fn get(&self) -> Result<Option<ConfigMap>, kube::Error>;
    /// A GET answered from the apiserver's watch cache with a version not
    /// older than `resource_version`: cheaper than [`Store::get`] (a quorum
    /// read from etcd), possibly not the latest.
    async fn get_not_older_than(
        &self,
        resource_version: &str,
    ) -> Result<Option<ConfigMap>, kube::Error>;
    async fn create(&self, cm: &ConfigMap) -> Result<ConfigMap, kube::Error>;
    /// A PUT carrying `metadata.resourceVersion`: fails with 409 if it changed.
    async fn replace(&self, cm: &ConfigMap) -> Result<ConfigMap, kube::Error>;
    /// A JSON Patch (RFC 6902, `ops` is its array), applied by the server to
    /// the latest object: fails with 422 when a `test` op does not hold.
    async fn patch(&self, ops: serde_json::Value) -> Result<ConfigMap, kube::Error>;
}

pub(super) struct KubeStore {
    pub(super) api: Api<ConfigMap>,
    pub(super) name: String,
}

#[async_trait::async_trait]
impl Store for KubeStore {
    async fn get(&self) -> Result<Option<ConfigMap>, kube::Error> {
        self.api.get_opt(&self.name).await
    }

    async fn get_not_older_than(
        &self,
        resource_version: &str,
    ) -> Result<Option<ConfigMap>, kube::Error> {
        match self
            .api
            .get_with(&self.name, &GetParams::at(resource_version))
            .await
        {
            Ok(cm) => Ok(Some(cm)),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn create(&self, cm: &ConfigMap) -> Result<ConfigMap, kube::Error> {
        self.api.create(&PostParams::default(), cm).await
    }

    async fn replace(&self, cm: &ConfigMap) -> Result<ConfigMap, kube::Error> {
        self.api
            .replace(&self.name, &PostParams::default(), cm)
            .await
    }

    async fn patch(&self, ops: serde_json::Value) -> Result<ConfigMap, kube::Error> {
        let ops = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Json::<()>(ops))
            .await
    }
}

/// Logging state shared by the CAS loop and the watch: warns once per new
/// problem and once per crossing of the size warning threshold.
pub(super) struct Observer {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) above_warn: AtomicBool,
    pub(super) problems: Mutex<Vec<String>>,
}

impl Observer {
    fn size(&self, bytes: usize) {
        let above = bytes > schema::WARN_BYTES;
        if self.above_warn.swap(above, Ordering::Relaxed) != above {
            if above {
                warn!(
                    namespace = %self.namespace, configmap = %self.name, bytes,
                    "the registry configmap is over {} KiB; writes that grow it past {} KiB are \
                     refused (Kubernetes limit: 1 MiB): remove stale members or unknown keys",
                    schema::WARN_BYTES / 1024,
                    schema::MAX_BYTES / 1024
                );
            } else {
                info!(namespace = %self.namespace, configmap = %self.name, bytes,
                      "the registry configmap is back under the size warning threshold");
            }
        }
    }

    fn problems(&self, snap: &Snapshot) {
        let Ok(mut seen) = self.problems.lock() else {
            return;
        };
        if *seen == snap.problems {
            return;
        }
        for p in snap.problems.iter().filter(|p| !seen.contains(p)) {
            warn!(namespace = %self.namespace, configmap = %self.name, "registry data: {p}");
        }
        seen.clone_from(&snap.problems);
    }

    /// Decodes an object (or its absence), logging what is new.
    pub(super) fn observe(&self, cm: Option<&ConfigMap>) -> Snapshot {
        let Some(cm) = cm else {
            return Snapshot::default();
        };
        let data = cm.data.clone().unwrap_or_default();
        self.size(object_size(&data, cm));
        let rv = Some(cm.metadata.resource_version.clone().unwrap_or_default());
        let snap = schema::decode(&data, rv);
        self.problems(&snap);
        snap
    }
}

/// The size Kubernetes counts against the 1 MiB limit: data and binaryData.
pub(super) fn object_size(data: &BTreeMap<String, String>, cm: &ConfigMap) -> usize {
    let binary: usize = cm
        .binary_data
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.0.len())
        .sum();
    schema::encoded_size(data) + binary
}
