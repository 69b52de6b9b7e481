//! The `#[idempotent]` attribute. Depend on `idempotent-runtime`, not on this crate: it
//! re-exports the attribute as `idempotent_runtime::idempotent`, and the generated code
//! reaches the runtime through its `__private` module. The attribute's documentation, with
//! an example per argument, is on the re-export.

mod args;
mod expand;
mod validate;

use proc_macro::TokenStream;
use quote::ToTokens;

/// Makes an `async fn` idempotent: see `idempotent_runtime::idempotent`.
#[proc_macro_attribute]
pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    entry(attr.into(), item.into()).into()
}

/// Parse, validate, expand. On any error the user's item is emitted unchanged beside the
/// errors, so the rest of the crate (and the IDE) keeps working and no follow-on errors
/// about a missing function pile up.
fn entry(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> proc_macro2::TokenStream {
    let func: syn::ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(_) => {
            let e = syn::Error::new(
                proc_macro2::Span::call_site(),
                "`#[idempotent]` goes on an `async fn` with a body",
            );
            return with_error(item, e);
        }
    };
    let args = match args::Args::parse(attr) {
        Ok(args) => args,
        Err(e) => {
            // Still report problems with the function itself in the same compile.
            let mut all = e;
            if let Err(shape) = expand::Shape::of(&func) {
                all.combine(shape);
            }
            return with_error(item, all);
        }
    };
    match validate::validate(&args, &func) {
        Ok(key) => expand::expand(&args, key, func.clone()),
        Err(e) => with_error(func.into_token_stream(), e),
    }
}

fn with_error(item: proc_macro2::TokenStream, e: syn::Error) -> proc_macro2::TokenStream {
    let mut out = item;
    out.extend(e.to_compile_error());
    out
}
