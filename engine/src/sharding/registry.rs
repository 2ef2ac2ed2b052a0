//! The server's sharders: uploaded by name, kept in the store with their component, compiled
//! once per process.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::{ShardInput, Sharder};
use crate::names::Name;
use crate::sandbox::GuestEngine;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("no sharder is named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Longest sharder name, in bytes.

#[derive(Clone)]
pub struct Sharders {
    store: Store,
    engine: GuestEngine,
    loaded: Arc<RwLock<BTreeMap<String, Arc<Sharder>>>>,
}

impl Sharders {
    /// Compiles the stored sharders. One that no longer compiles is left out, with an error in
    /// the log; uploading it again replaces it.
    pub async fn open(store: Store, engine: GuestEngine) -> anyhow::Result<Sharders> {
        let stored = store.blocking(|store| store.stored_sharders()).await?;
        let mut loaded = BTreeMap::new();
        for (name, sha256) in stored {
            let bytes = {
                let sha256 = sha256.clone();
                store
                    .blocking(move |store| store.component(&sha256))
                    .await?
            };
            let engine = engine.clone();
            let compiled = tokio::task::spawn_blocking(move || match bytes {
                Some(bytes) => Sharder::new(&engine, &bytes),
                None => Err(anyhow::anyhow!("its component is missing")),
            })
            .await?;
            match compiled {
                Ok(sharder) => {
                    loaded.insert(name, Arc::new(sharder));
                }
                Err(error) => {
                    tracing::error!(sharder = %name, error = format!("{error:#}"), "cannot load sharder")
                }
            }
        }
        Ok(Sharders {
            store,
            engine,
            loaded: Arc::new(RwLock::new(loaded)),
        })
    }

    /// Validates and stores a sharder; returns whether the name is new, and the component's hash.
    pub async fn deploy(&self, name: &str, bytes: Vec<u8>) -> Result<(bool, String), ShardError> {
        Name::Sharder.check(name).map_err(ShardError::Invalid)?;
        if bytes.is_empty() {
            return Err(ShardError::Invalid(
                "the body must be a WebAssembly component; it is empty".into(),
            ));
        }
        let engine = self.engine.clone();
        let (compiled, bytes) = tokio::task::spawn_blocking(move || {
            let compiled = Sharder::new(&engine, &bytes);
            (compiled, bytes)
        })
        .await
        .map_err(|error| ShardError::Invalid(format!("compilation failed: {error}")))?;
        let sharder = compiled.map_err(|error| ShardError::Invalid(format!("{error:#}")))?;
        let sha256 = sharder.sha256().to_owned();
        self.store
            .save_sharder(name.to_owned(), sha256.clone(), bytes)
            .await?;
        let created = self
            .loaded
            .write()
            .expect("sharders")
            .insert(name.to_owned(), Arc::new(sharder))
            .is_none();
        Ok((created, sha256))
    }

    pub fn get(&self, name: &str) -> Result<Arc<Sharder>, ShardError> {
        self.loaded
            .read()
            .expect("sharders")
            .get(name)
            .cloned()
            .ok_or_else(|| ShardError::NotFound(name.to_owned()))
    }

    /// Every sharder: name and component hash.
    pub fn list(&self) -> Vec<(String, String)> {
        self.loaded
            .read()
            .expect("sharders")
            .iter()
            .map(|(name, sharder)| (name.clone(), sharder.sha256().to_owned()))
            .collect()
    }

    /// The component's bytes, for clients that run it themselves.
    pub async fn component(&self, name: &str) -> Result<Vec<u8>, ShardError> {
        let sha256 = self.get(name)?.sha256().to_owned();
        self.store
            .blocking(move |store| store.component(&sha256))
            .await?
            .ok_or_else(|| ShardError::NotFound(name.to_owned()))
    }

    /// Shards a batch on the blocking pool.
    pub async fn shard(
        &self,
        name: &str,
        inputs: Vec<ShardInput>,
        shards: u32,
    ) -> Result<Vec<u32>, ShardError> {
        let sharder = self.get(name)?;
        tokio::task::spawn_blocking(move || sharder.shard(&inputs, shards))
            .await
            .map_err(|error| ShardError::Invalid(format!("the sharder failed: {error}")))?
            .map_err(|error| ShardError::Invalid(format!("{error:#}")))
    }

    pub async fn delete(&self, name: &str) -> Result<(), ShardError> {
        self.get(name)?;
        self.store.remove_sharder(name.to_owned()).await?;
        self.loaded.write().expect("sharders").remove(name);
        Ok(())
    }
}
