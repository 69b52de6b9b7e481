//! The checks between the arguments and the function, made before any code is generated.

use syn::{Expr, ItemFn};

use crate::args::{attribute_span, Args, Errors, OnCancel};
use crate::expand::Shape;

/// Checks that the attribute can apply to `item`, and returns the key expression.
/// Reports every problem found, not only the first.
pub(crate) fn validate<'a>(args: &'a Args, item: &ItemFn) -> syn::Result<&'a Expr> {
    let mut errors = Errors::default();
    if let Err(e) = Shape::of(item) {
        errors.push(e);
    }
    if let Some(tx) = &args.transaction {
        if args.on_cancel == Some(OnCancel::Finish) {
            errors.push(syn::Error::new(
                tx.span(),
                "`transaction` cannot be combined with `on_cancel = \"finish\"`: a cancelled \
                 caller's transaction rolls back, so its body never stops half-way",
            ));
        }
        if args.store.is_none() {
            errors.push(syn::Error::new(
                tx.span(),
                "`transaction` needs `store = <an engine over a PostgresStore>`: the default \
                 engine keeps its records in memory, outside any database transaction",
            ));
        }
        if binds(item, tx) {
            errors.push(syn::Error::new(
                tx.span(),
                format!(
                    "`{tx}` is an argument of this function, so the body could not reach \
                     both; give the transaction another name"
                ),
            ));
        }
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

/// Whether one of the function's arguments is bound to `name`.
fn binds(item: &ItemFn, name: &syn::Ident) -> bool {
    item.sig.inputs.iter().any(|input| match input {
        syn::FnArg::Receiver(_) => name == "self",
        syn::FnArg::Typed(arg) => pattern_binds(&arg.pat, name),
    })
}

fn pattern_binds(pat: &syn::Pat, name: &syn::Ident) -> bool {
    match pat {
        syn::Pat::Ident(p) => p.ident == *name,
        syn::Pat::Reference(r) => pattern_binds(&r.pat, name),
        syn::Pat::Tuple(t) => t.elems.iter().any(|p| pattern_binds(p, name)),
        syn::Pat::TupleStruct(t) => t.elems.iter().any(|p| pattern_binds(p, name)),
        syn::Pat::Struct(s) => s.fields.iter().any(|f| pattern_binds(&f.pat, name)),
        syn::Pat::Slice(s) => s.elems.iter().any(|p| pattern_binds(p, name)),
        syn::Pat::Type(t) => pattern_binds(&t.pat, name),
        syn::Pat::Paren(p) => pattern_binds(&p.pat, name),
        _ => false,
    }
}
