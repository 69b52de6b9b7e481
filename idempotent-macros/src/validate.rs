//! The checks between the arguments and the function, made before any code is generated.

use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;
use syn::spanned::Spanned;
use syn::{Expr, ItemFn};

use crate::args::{attribute_span, Args, Errors, MissingKey, OnCancel};
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
    if let (Some((MissingKey::Run, lit)), Some(_)) = (&args.on_missing_key, &args.transaction) {
        errors.push(syn::Error::new(
            lit.span(),
            "`on_missing_key = \"run\"` cannot be combined with `transaction`: the body's \
             transaction comes with the key's claim; use `on_missing_key = \"fail\"`",
        ));
    }
    if let (Some(key), None) = (&args.key, &args.key_const) {
        if let Err(e) = key_uses_arguments(key, item) {
            errors.push(e);
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

/// Refuses the keys that give every call one key: a literal (`key = "order_id"`), and an
/// expression that reads none of the arguments. `key = const ...` says that is meant.
fn key_uses_arguments(key: &Expr, item: &ItemFn) -> syn::Result<()> {
    let mut inner = key;
    while let Expr::Paren(p) = inner {
        inner = &p.expr;
    }
    // `key = const { .. }`, an inline const block, says it is meant as `key = const ..` does.
    if let Expr::Const(_) = inner {
        return Ok(());
    }
    if let Expr::Lit(lit) = inner {
        let text = lit.lit.to_token_stream().to_string();
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "`key = {text}` is one key for every call: `f(1)` and `f(2)` would share one \
                 stored result. Write an expression over the arguments, e.g. `key = order_id`, \
                 or `key = const {text}` if every call is meant to share this key"
            ),
        ));
    }
    let names = argument_names(item);
    if mentions(key.to_token_stream(), &names) {
        return Ok(());
    }
    let listed = if names.is_empty() {
        "this function has none".to_owned()
    } else {
        let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
        format!("it has {}", quoted.join(", "))
    };
    // `#[async_trait]` runs first on a trait impl and renames each pattern argument
    // `__argN`, so the names the key was written over are gone by now.
    let renamed = names.iter().any(|n| n.starts_with("__arg"));
    let hint = if renamed {
        " `__arg1` and the like are `#[async_trait]`'s names for arguments written as \
         patterns (`Order { id, .. }: Order`): its rewrite hides the names they bind, so \
         bind such an argument to a name (`order: Order`) and write the key over it \
         (`key = order.id`)."
    } else {
        ""
    };
    Err(syn::Error::new(
        key.span(),
        format!(
            "this key uses none of the function's arguments ({listed}), so calls with \
             different arguments could share one key and one stored result. Derive it from \
             the arguments, or write `key = const ...` if that is meant (a key read from a \
             task-local, say).{hint}"
        ),
    ))
}

/// Every name the function's arguments bind, `self` included.
fn argument_names(item: &ItemFn) -> Vec<String> {
    let mut names = Vec::new();
    for input in &item.sig.inputs {
        match input {
            syn::FnArg::Receiver(_) => names.push("self".to_owned()),
            syn::FnArg::Typed(arg) => pattern_names(&arg.pat, &mut names),
        }
    }
    names
}

fn pattern_names(pat: &syn::Pat, names: &mut Vec<String>) {
    match pat {
        syn::Pat::Ident(p) => {
            names.push(p.ident.to_string());
            if let Some((_, sub)) = &p.subpat {
                pattern_names(sub, names);
            }
        }
        syn::Pat::Reference(r) => pattern_names(&r.pat, names),
        syn::Pat::Tuple(t) => t.elems.iter().for_each(|p| pattern_names(p, names)),
        syn::Pat::TupleStruct(t) => t.elems.iter().for_each(|p| pattern_names(p, names)),
        syn::Pat::Struct(s) => s.fields.iter().for_each(|f| pattern_names(&f.pat, names)),
        syn::Pat::Slice(s) => s.elems.iter().for_each(|p| pattern_names(p, names)),
        syn::Pat::Type(t) => pattern_names(&t.pat, names),
        syn::Pat::Paren(p) => pattern_names(&p.pat, names),
        _ => {}
    }
}

/// Whether `tokens` name one of `names`: as an identifier at any depth (inside macro
/// calls too), or as an inline argument of a format string in a macro call
/// (`format!("{id}")`). A name that is also a field or a method (`x.id`) counts too: this
/// check errs towards letting a key through, never towards refusing one that reads an
/// argument.
fn mentions(tokens: TokenStream, names: &[String]) -> bool {
    mentions_in(tokens, names, false)
}

/// `in_macro`: whether `tokens` are a macro call's, where a string may be a format string.
/// Outside one, `"order-{id}"` is plain text, the same for every call.
fn mentions_in(tokens: TokenStream, names: &[String], in_macro: bool) -> bool {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    tokens.iter().enumerate().any(|(at, tt)| match tt {
        TokenTree::Ident(i) => names.iter().any(|n| i == n),
        TokenTree::Group(g) => {
            let called = at >= 2
                && matches!(&tokens[at - 1], TokenTree::Punct(p) if p.as_char() == '!')
                && matches!(&tokens[at - 2], TokenTree::Ident(_));
            mentions_in(g.stream(), names, in_macro || called)
        }
        TokenTree::Literal(l) => {
            in_macro
                && format_arguments(&l.to_string())
                    .iter()
                    .any(|arg| names.iter().any(|n| n == arg))
        }
        TokenTree::Punct(_) => false,
    })
}

/// The names a string literal's `{name}`, `{name:?}` placeholders refer to; `{{` is an
/// escaped brace.
fn format_arguments(literal: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = literal;
    while let Some(at) = rest.find('{') {
        let after = &rest[at + 1..];
        if let Some(escaped) = after.strip_prefix('{') {
            rest = escaped;
            continue;
        }
        let end = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if end > 0 {
            found.push(&after[..end]);
        }
        rest = after;
    }
    found
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

#[cfg(test)]
mod tests {
    use super::*;

    fn item(src: &str) -> ItemFn {
        syn::parse_str(src).expect("a function")
    }

    fn key(src: &str) -> Expr {
        syn::parse_str(src).expect("an expression")
    }

    #[test]
    fn keys_over_arguments_pass() {
        let f = item("async fn f(order: Order, (a, b): (u8, u8), mut n: u64) -> R { x }");
        for k in [
            "order.id",
            "a",
            "n + 1",
            "format!(\"{}-{}\", order.id, b)",
            "format!(\"{order:?}\")",
            "(order.id)",
            "Key::new(&order)",
            "format!(\"{}\", (b))",
            "String::from(format!(\"x-{order:?}\"))",
        ] {
            assert!(key_uses_arguments(&key(k), &f).is_ok(), "{k}");
        }
        let m = item("async fn m(&self) -> R { x }");
        assert!(key_uses_arguments(&key("self.id"), &m).is_ok());
    }

    #[test]
    fn keys_that_share_one_value_are_refused() {
        let f = item("async fn f(order: Order) -> R { x }");
        for k in [
            "\"order_id\"",
            "(\"order_id\")",
            "42",
            "ORDER",
            "uuid::Uuid::new_v4()",
            "format!(\"{{order}}\")",
            // A placeholder outside a macro call is plain text.
            "\"order-{order}\".to_owned()",
            "String::from(\"{order}\")",
        ] {
            assert!(key_uses_arguments(&key(k), &f).is_err(), "{k}");
        }
        let none = item("async fn g() -> R { x }");
        assert!(key_uses_arguments(&key("current_id()"), &none).is_err());
    }

    #[test]
    fn format_placeholders_are_read() {
        assert_eq!(format_arguments("\"{id}-{n:?}-{}\""), vec!["id", "n"]);
        assert_eq!(format_arguments("\"{{id}}\""), Vec::<&str>::new());
    }
}
