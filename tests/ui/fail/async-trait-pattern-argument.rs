// A pattern argument of an `#[async_trait]` method: `#[async_trait]` renames it `__arg1`
// before this attribute runs. A key over `id` is refused, with a message that says where
// `__arg1` comes from and what to write instead.
use async_trait::async_trait;
use idempotent_runtime::{idempotent, Error};

pub struct Order {
    pub id: u64,
    pub cents: u64,
}

#[async_trait]
pub trait Ship {
    async fn ship(&self, order: Order) -> Result<u64, Error>;
}

pub struct Shipper;

#[async_trait]
impl Ship for Shipper {
    #[idempotent(key = id, scope = "ship")]
    async fn ship(&self, Order { id, cents }: Order) -> Result<u64, Error> {
        Ok(id + cents)
    }
}

fn main() {}
