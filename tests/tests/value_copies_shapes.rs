//! Return types that may borrow, or are type parameters, compile as before: their hits
//! decode (method resolution, which picks copies, does not see lifetimes, so the
//! attribute leaves them to decoding unless told `replay = "clone"`).
#![allow(dead_code)]

use std::borrow::Cow;

use idempotent_runtime::{idempotent, Error, Idempotency};
use serde::de::DeserializeOwned;
use serde::Serialize;

// A return value borrowing an argument's lifetime (Clone + Send + Sync, not 'static).
#[idempotent(key = k, store = idem, scope = "rc.cow")]
async fn cow_borrowed<'a>(idem: &Idempotency, k: u32, s: &'a str) -> Result<Cow<'a, str>, Error> {
    Ok(Cow::Borrowed(s))
}

// A generic value, Clone + Send + Sync but without 'static.
#[idempotent(key = k, store = idem, scope = "rc.gen")]
async fn generic_clone<T: Clone + Send + Sync + Serialize + DeserializeOwned + Default>(
    idem: &Idempotency,
    k: u32,
) -> Result<T, Error> {
    Ok(T::default())
}

// Told to clone: a generic value with `'static` in its bounds.
#[idempotent(key = k, store = idem, scope = "rc.forced", replay = "clone")]
async fn forced_clone<T: Clone + Send + Sync + Serialize + DeserializeOwned + Default + 'static>(
    idem: &Idempotency,
    k: u32,
) -> Result<T, Error> {
    Ok(T::default())
}

#[async_trait::async_trait]
trait Source {
    async fn get(&self, k: u32) -> Result<String, Error>;
}

struct Holder {
    idem: Idempotency,
}

#[async_trait::async_trait]
impl Source for Holder {
    #[idempotent(key = k, store = &self.idem, scope = "rc.at")]
    async fn get(&self, k: u32) -> Result<String, Error> {
        Ok(format!("v{k}"))
    }
}

// async_trait impl generic over the value type, Clone without 'static.
#[async_trait::async_trait]
trait GenSource<T> {
    async fn fetch(&self, k: u32) -> Result<T, Error>;
}

struct GenHolder {
    idem: Idempotency,
}

#[async_trait::async_trait]
impl<T: Clone + Send + Sync + Serialize + DeserializeOwned + Default + 'static> GenSource<T>
    for GenHolder
{
    #[idempotent(key = k, store = &self.idem, scope = "rc.gen_at")]
    async fn fetch(&self, k: u32) -> Result<T, Error> {
        Ok(T::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn these_compile_and_replay() {
    let idem = Idempotency::memory();
    assert_eq!(generic_clone::<String>(&idem, 1).await.unwrap(), "");
    assert_eq!(generic_clone::<String>(&idem, 1).await.unwrap(), "");
    let h = Holder { idem: idem.clone() };
    assert_eq!(h.get(1).await.unwrap(), "v1");
    assert_eq!(h.get(1).await.unwrap(), "v1");
    assert_eq!(h.get(1).await.unwrap(), "v1");
    assert_eq!(cow_borrowed(&idem, 1, "x").await.unwrap(), "x");
    assert_eq!(cow_borrowed(&idem, 1, "y").await.unwrap(), "x");
    for _ in 0..3 {
        assert_eq!(forced_clone::<String>(&idem, 1).await.unwrap(), "");
    }
    let g = GenHolder { idem: idem.clone() };
    assert_eq!(GenSource::<u64>::fetch(&g, 1).await.unwrap(), 0);
    assert_eq!(GenSource::<u64>::fetch(&g, 1).await.unwrap(), 0);
}
