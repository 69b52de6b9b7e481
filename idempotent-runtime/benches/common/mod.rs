//! The value every benchmark stores and replays: a five-field receipt, 100 bytes of JSON.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Receipt {
    pub(crate) payment_id: String,
    pub(crate) order_id: String,
    pub(crate) cents: u64,
    pub(crate) currency: String,
    pub(crate) captured: bool,
}

pub(crate) fn receipt() -> Receipt {
    Receipt {
        payment_id: "pay_0001".into(),
        order_id: "order-1001".into(),
        cents: 4_999,
        currency: "EUR".into(),
        captured: true,
    }
}
