// Shapes the key check and the return type's respan must leave alone.
use async_trait::async_trait;
use idempotent_runtime::{idempotent, Error, Idempotency};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
pub struct Order {
    pub id: u64,
}

// A pattern argument (no async_trait).
#[idempotent(key = id)]
async fn by_pattern(Order { id }: Order) -> Result<u64, Error> {
    Ok(id)
}

// `mut` argument, method call on an argument, nested macro with positional argument.
#[idempotent(key = format!("{}", o.id.to_string().len()))]
async fn nested(mut o: Order) -> Result<u64, Error> {
    o.id += 1;
    Ok(o.id)
}

// An `impl Trait` argument.
#[idempotent(key = k.to_string())]
async fn with_impl(k: impl std::fmt::Display + Send) -> Result<u64, Error> {
    Ok(1)
}

// A generic return type.
#[idempotent(key = k, replay = "decode")]
async fn generic<T: Serialize + DeserializeOwned + Send + Sync + 'static>(k: u64, t: T) -> Result<T, Error> {
    Ok(t)
}

pub struct Svc {
    idem: Idempotency,
    id: u64,
}

impl Svc {
    // `Self` in the return type, `self.field` in the key.
    #[idempotent(key = self.id, store = &self.idem)]
    async fn me(&self) -> Result<Wrapper<u64>, Error> {
        Ok(Wrapper(self.id))
    }
}

#[derive(Clone, Serialize, Deserialize)]
pub struct Wrapper<T>(T);

#[derive(Clone, Serialize, Deserialize)]
pub struct Made(u64);
impl Made {
    #[idempotent(key = k)]
    async fn make(k: u64) -> Result<Self, Error> {
        Ok(Made(k))
    }
}

#[async_trait]
pub trait Ship {
    async fn ship(&self, id: u64, n: impl Into<u64> + Send + 'async_trait) -> Result<u64, Error>;
    async fn shipm(&self, id: u64) -> Result<u64, Error>;
    async fn shipo(&self, id: &Option<String>) -> Result<u64, Error>;
}

#[async_trait]
impl Ship for Svc {
    #[idempotent(key = id, store = &self.idem)]
    async fn ship(&self, id: u64, n: impl Into<u64> + Send + 'async_trait) -> Result<u64, Error> {
        Ok(id + n.into())
    }
    #[idempotent(key = id, store = &self.idem)]
    async fn shipm(&self, mut id: u64) -> Result<u64, Error> {
        id += 1;
        Ok(id)
    }
    // `&Option<T>` under on_missing_key inside async_trait.
    #[idempotent(key = id, on_missing_key = "fail", store = &self.idem)]
    async fn shipo(&self, id: &Option<String>) -> Result<u64, Error> {
        Ok(1)
    }
}

// Option<&str>, and an Option under concurrent = "reject".
#[idempotent(key = id, on_missing_key = "run", concurrent = "reject")]
async fn borrowed(id: Option<&str>) -> Result<u64, Error> {
    Ok(1)
}

fn main() {}
