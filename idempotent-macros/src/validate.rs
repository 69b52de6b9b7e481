//! The checks between the arguments and the function, made before any code is generated.

use syn::{Expr, ItemFn};

use crate::args::{attribute_span, Args, Errors};
use crate::expand::Shape;

/// Checks that the attribute can apply to `item`, and returns the key expression.
/// Reports every problem found, not only the first.
pub(crate) fn validate<'a>(args: &'a Args, item: &ItemFn) -> syn::Result<&'a Expr> {
    let mut errors = Errors::default();
    if let Err(e) = Shape::of(item) {
        errors.push(e);
    }
    if args.key.is_none() {
        errors.push(syn::Error::new(
            attribute_span(),
            "missing `key = ...`: the idempotency key, an expression over the arguments, \
             e.g. `#[idempotent(key = order.id)]`",
        ));
    }
    errors.finish()?;
    args.key
        .as_ref()
        .ok_or_else(|| syn::Error::new(attribute_span(), "missing `key = ...`"))
}
