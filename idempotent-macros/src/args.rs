//! The attribute's arguments, parsed into a typed struct. Each value keeps the tokens it
//! came from, so every later error points at the exact argument.

use std::time::Duration;

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Ident, LitBool, LitStr, Path, Token};

/// The names the attribute accepts, for suggestions.
const NAMES: &[&str] = &[
    "key",
    "ttl",
    "lease",
    "store",
    "scope",
    "fingerprint",
    "cache_errors",
    "concurrent",
    "on_cancel",
    "replay",
    "transaction",
    "on_missing_key",
    "crate",
];

// The runtime's bounds (`idempotent_runtime::{MIN_TTL, MAX_TTL, MIN_LEASE}`), repeated here
// because a proc-macro crate cannot depend on the runtime; the trybuild cases in the
// workspace's `tests` crate (`ttl-out-of-range`, `lease-out-of-range`, and the `pass` case
// at the limits) fail if they drift apart.
const MIN_TTL: Duration = Duration::from_millis(1);
const MAX_TTL: Duration = Duration::from_secs(100 * 31_557_600);
const MIN_LEASE: Duration = Duration::from_millis(100);

/// What a duplicate does while the first call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Concurrent {
    Wait,
    Reject,
}

/// What happens to the body when its caller is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnCancel {
    /// The body stops with its caller and the key is released (the default).
    Release,
    /// The body runs on a task of its own, to its end, and its result is stored.
    Finish,
}

/// How hits get their value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// Clone a typed copy kept in this process (the value must be `Clone + Send + Sync +
    /// 'static`).
    Clone,
    /// Decode the stored record on every hit.
    Decode,
}

/// What a call does when its `Option` key is `None` (`on_missing_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MissingKey {
    /// Run the body directly, without idempotency.
    Run,
    /// Fail with `Error::InvalidKey`, running nothing.
    Fail,
}

/// `#[idempotent(...)]`, parsed.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) key: Option<Expr>,
    /// `key = const ...`: the key is meant not to come from the arguments (one key shared
    /// by every call, or one read from elsewhere), so the footgun checks stand aside.
    pub(crate) key_const: Option<Token![const]>,
    /// `on_missing_key = "run" | "fail"`: the key is an `Option`.
    pub(crate) on_missing_key: Option<(MissingKey, LitStr)>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) lease: Option<Duration>,
    pub(crate) store: Option<Expr>,
    pub(crate) scope: Option<LitStr>,
    pub(crate) fingerprint: Option<Expr>,
    pub(crate) cache_errors: bool,
    pub(crate) concurrent: Option<Concurrent>,
    pub(crate) on_cancel: Option<OnCancel>,
    /// `None`: clone where the return type is plainly a `'static` type, decode otherwise.
    pub(crate) replay: Option<Replay>,
    /// The name the body reaches its transaction by (`transaction = tx`).
    pub(crate) transaction: Option<Ident>,
    pub(crate) krate: Option<Path>,
}

/// One `name = value` pair, before its value is checked.
struct Arg {
    name: Ident,
    /// `name = const value`, which only `key` takes.
    constant: Option<Token![const]>,
    value: Expr,
}

impl Parse for Arg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        // `crate` is a keyword, so it is not an `Ident` to syn.
        let name = if input.peek(Token![crate]) {
            let kw: Token![crate] = input.parse()?;
            Ident::new("crate", kw.span)
        } else {
            input.call(Ident::parse_any)?
        };
        if !input.peek(Token![=]) {
            return Err(syn::Error::new(
                name.span(),
                format!("expected `{name} = ...`"),
            ));
        }
        input.parse::<Token![=]>()?;
        // `const "..."` is no expression; `const { .. }` is one (an inline const block),
        // and stays the value.
        let constant = if input.peek(Token![const]) && !input.peek2(syn::token::Brace) {
            Some(input.parse()?)
        } else {
            None
        };
        let value = input.parse()?;
        Ok(Self {
            name,
            constant,
            value,
        })
    }
}

impl Args {
    /// Parses the attribute's tokens, reporting every mistake at once.
    pub(crate) fn parse(tokens: proc_macro2::TokenStream) -> syn::Result<Self> {
        let pairs =
            syn::parse::Parser::parse2(Punctuated::<Arg, Token![,]>::parse_terminated, tokens)?;
        let mut args = Args::default();
        let mut errors = Errors::default();
        let mut seen: Vec<String> = Vec::new();
        for Arg {
            name,
            constant,
            value,
        } in pairs
        {
            let n = name.to_string();
            if seen.contains(&n) {
                errors.push(syn::Error::new(
                    name.span(),
                    format!("duplicate argument `{n}`"),
                ));
                continue;
            }
            seen.push(n.clone());
            if let Some(kw) = constant {
                if n == "key" {
                    args.key_const = Some(kw);
                } else {
                    errors.push(syn::Error::new(
                        kw.span,
                        format!(
                            "`const` marks a key that does not come from the arguments; \
                             `{n}` does not take it"
                        ),
                    ));
                    continue;
                }
            }
            if let Err(e) = args.set(&n, &name, value) {
                errors.push(e);
            }
        }
        errors.finish()?;
        Ok(args)
    }

    fn set(&mut self, n: &str, name: &Ident, value: Expr) -> syn::Result<()> {
        match n {
            "key" => self.key = Some(value),
            "store" => self.store = Some(value),
            "fingerprint" => self.fingerprint = Some(value),
            "ttl" => self.ttl = Some(duration(name, &value)?),
            "lease" => self.lease = Some(duration(name, &value)?),
            "scope" => self.scope = Some(scope(&value)?),
            "cache_errors" => self.cache_errors = boolean(name, &value)?,
            "concurrent" => self.concurrent = Some(concurrent(&value)?),
            "on_cancel" => self.on_cancel = Some(on_cancel(&value)?),
            "replay" => self.replay = Some(replay(&value)?),
            "transaction" => self.transaction = Some(transaction(&value)?),
            "on_missing_key" => self.on_missing_key = Some(missing_key(&value)?),
            "crate" => self.krate = Some(crate_path(&value)?),
            _ => return Err(unknown(name)),
        }
        Ok(())
    }
}

/// Collects errors so that one compile reports them all.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

fn unknown(name: &Ident) -> syn::Error {
    let n = name.to_string();
    let nearest = NAMES
        .iter()
        .map(|cand| (edit_distance(&n, cand), cand))
        .min()
        .filter(|(d, _)| *d <= 3);
    let hint = match nearest {
        Some((_, cand)) => format!("; did you mean `{cand}`?"),
        None => format!("; expected one of: {}", NAMES.join(", ")),
    };
    syn::Error::new(name.span(), format!("unknown argument `{n}`{hint}"))
}

/// `transaction = tx`: a plain name, which the body then uses as its transaction.
fn transaction(value: &Expr) -> syn::Result<Ident> {
    match value {
        Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => match p.path.get_ident() {
            Some(ident) => Ok(ident.clone()),
            None => Err(syn::Error::new(
                value.span(),
                "expected a name for the body's transaction, e.g. `transaction = tx`",
            )),
        },
        other => Err(syn::Error::new(
            other.span(),
            "expected a name for the body's transaction, e.g. `transaction = tx` (a name, not a string)",
        )),
    }
}

fn lit_str(value: &Expr, what: &str) -> syn::Result<LitStr> {
    match value {
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) => Ok(s.clone()),
        other => Err(syn::Error::new(other.span(), format!("expected {what}"))),
    }
}

fn duration(name: &Ident, value: &Expr) -> syn::Result<Duration> {
    let example = if name == "ttl" { "24h" } else { "30s" };
    let lit = lit_str(
        value,
        &format!("a duration string, e.g. `{name} = \"{example}\"`"),
    )?;
    let d = humantime::parse_duration(&lit.value()).map_err(|e| {
        syn::Error::new(
            lit.span(),
            format!(
                "invalid {name} {:?}: {e}; write e.g. \"{example}\", \"90s\", \"1h 30m\"",
                lit.value()
            ),
        )
    })?;
    let (min, min_text) = if name == "ttl" {
        (MIN_TTL, "1ms")
    } else {
        (MIN_LEASE, "100ms")
    };
    if d < min {
        let why = if name == "ttl" {
            "stores keep time in milliseconds"
        } else {
            "the holder renews every third of it, which must fit a store round trip"
        };
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "{name} must be at least {min_text}, got {:?}: {why}",
                lit.value()
            ),
        ));
    }
    if d > MAX_TTL {
        return Err(syn::Error::new(
            lit.span(),
            format!(
                "{name} must be at most 100 years, got {:?}: longer is past what every store can hold",
                lit.value()
            ),
        ));
    }
    Ok(d)
}

fn scope(value: &Expr) -> syn::Result<LitStr> {
    let lit = lit_str(value, "a string, e.g. `scope = \"payments.charge\"`")?;
    let text = lit.value();
    if text.is_empty() || text.contains('|') {
        return Err(syn::Error::new(
            lit.span(),
            "the scope must be non-empty and must not contain `|`",
        ));
    }
    Ok(lit)
}

fn boolean(name: &Ident, value: &Expr) -> syn::Result<bool> {
    match value {
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Bool(LitBool { value, .. }),
            ..
        }) => Ok(*value),
        other => Err(syn::Error::new(
            other.span(),
            format!("expected `{name} = true` or `{name} = false`"),
        )),
    }
}

fn concurrent(value: &Expr) -> syn::Result<Concurrent> {
    let lit = lit_str(
        value,
        "`concurrent = \"wait\"` or `concurrent = \"reject\"`",
    )?;
    match lit.value().as_str() {
        "wait" => Ok(Concurrent::Wait),
        "reject" => Ok(Concurrent::Reject),
        other => Err(syn::Error::new(
            lit.span(),
            format!("unknown concurrency {other:?}; expected \"wait\" or \"reject\""),
        )),
    }
}

fn on_cancel(value: &Expr) -> syn::Result<OnCancel> {
    let lit = lit_str(
        value,
        "`on_cancel = \"release\"` or `on_cancel = \"finish\"`",
    )?;
    match lit.value().as_str() {
        "release" => Ok(OnCancel::Release),
        "finish" => Ok(OnCancel::Finish),
        other => Err(syn::Error::new(
            lit.span(),
            format!("unknown on_cancel {other:?}; expected \"release\" or \"finish\""),
        )),
    }
}

fn missing_key(value: &Expr) -> syn::Result<(MissingKey, LitStr)> {
    let lit = lit_str(
        value,
        "`on_missing_key = \"run\"` or `on_missing_key = \"fail\"`",
    )?;
    match lit.value().as_str() {
        "run" => Ok((MissingKey::Run, lit)),
        "fail" => Ok((MissingKey::Fail, lit)),
        other => Err(syn::Error::new(
            lit.span(),
            format!("unknown on_missing_key {other:?}; expected \"run\" or \"fail\""),
        )),
    }
}

fn replay(value: &Expr) -> syn::Result<Replay> {
    let lit = lit_str(value, "`replay = \"clone\"` or `replay = \"decode\"`")?;
    match lit.value().as_str() {
        "clone" => Ok(Replay::Clone),
        "decode" => Ok(Replay::Decode),
        other => Err(syn::Error::new(
            lit.span(),
            format!("unknown replay {other:?}; expected \"clone\" or \"decode\""),
        )),
    }
}

/// `crate = "path"` (as tokio's macros take it) or `crate = path`.
fn crate_path(value: &Expr) -> syn::Result<Path> {
    const HELP: &str = "expected the path of a crate that re-exports idempotent_runtime, e.g. `crate = \"my_crate::idempotent\"`";
    match value {
        Expr::Path(p) if p.qself.is_none() => Ok(p.path.clone()),
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) => s.parse().map_err(|_| syn::Error::new(s.span(), HELP)),
        other => Err(syn::Error::new(other.span(), HELP)),
    }
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// The span to blame for a missing argument: the whole attribute.
pub(crate) fn attribute_span() -> Span {
    Span::call_site()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_names() {
        assert_eq!(edit_distance("kye", "key"), 2);
        assert_eq!(edit_distance("ttl", "ttl"), 0);
        assert_eq!(edit_distance("fingerprnt", "fingerprint"), 1);
    }
}
