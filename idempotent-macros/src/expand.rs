//! Code generation: the parsed arguments and the user's function in, the rewritten
//! function out. Nothing here parses or validates arguments.

use proc_macro2::{Ident, Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Block, Expr, ItemFn, Path, ReturnType, Stmt, Type};

use crate::args::{Args, Concurrent, MissingKey, OnCancel, Replay};

/// The names the generated code binds. Hygienic (`mixed_site`, as `macro_rules!` locals
/// are): an argument or a local of the user's with the same name neither sees them nor
/// is shadowed by them.
struct Names {
    engine: Ident,
    call: Ident,
    ret: Ident,
    body: Ident,
    answer: Ident,
    rest: Ident,
}

impl Names {
    fn new() -> Self {
        let name = |n: &str| Ident::new(n, Span::mixed_site());
        Self {
            engine: name("__idempotent_engine"),
            call: name("__idempotent_call"),
            ret: name("__idempotent_ret"),
            body: name("__idempotent_body"),
            answer: name("__idempotent_answer"),
            rest: name("__idempotent_rest"),
        }
    }
}

/// The two shapes the attribute accepts.
pub(crate) enum Shape<'a> {
    /// `async fn f(..) -> R { body }`.
    AsyncFn { ret: &'a Type },
    /// What `#[async_trait]` makes of an `async fn` before this attribute runs:
    /// `fn f(..) -> Pin<Box<dyn Future<Output = R> + ..>> { X(async move { body }) }`.
    /// The async block inside is wrapped instead of the function's body.
    BoxedAsyncBlock,
}

impl<'a> Shape<'a> {
    /// Recognises the function's shape by its structure, or says why it cannot be used.
    pub(crate) fn of(item: &'a ItemFn) -> syn::Result<Self> {
        if item.sig.asyncness.is_some() {
            return match &item.sig.output {
                ReturnType::Type(_, ret) => Ok(Shape::AsyncFn { ret }),
                ReturnType::Default => Err(syn::Error::new(
                    item.sig.ident.span(),
                    "`#[idempotent]` functions must return `Result<T, E>`; this one returns `()`",
                )),
            };
        }
        if boxed_async_block(&item.block).is_some() {
            return Ok(Shape::BoxedAsyncBlock);
        }
        Err(syn::Error::new(
            item.sig.fn_token.span,
            "`#[idempotent]` goes on an `async fn`; make this function `async`",
        ))
    }
}

/// The `async move { .. }` block that is the single argument of the block's tail call.
fn boxed_async_block(block: &Block) -> Option<&syn::ExprAsync> {
    let [Stmt::Expr(Expr::Call(call), None)] = block.stmts.as_slice() else {
        return None;
    };
    match call.args.iter().collect::<Vec<_>>().as_slice() {
        [Expr::Async(inner)] if inner.capture.is_some() => Some(inner),
        _ => None,
    }
}

fn boxed_async_block_mut(block: &mut Block) -> Option<&mut syn::ExprAsync> {
    let [Stmt::Expr(Expr::Call(call), None)] = block.stmts.as_mut_slice() else {
        return None;
    };
    match call.args.iter_mut().next() {
        Some(Expr::Async(inner)) => Some(inner),
        _ => None,
    }
}

/// Rewrites `item` so its body runs through the engine.
pub(crate) fn expand(args: &Args, key: &Expr, mut item: ItemFn) -> TokenStream {
    let krate: Path = args
        .krate
        .clone()
        .unwrap_or_else(|| syn::parse_quote!(::idempotent_runtime));
    let names = Names::new();
    let prelude = prelude(args, key, &item, &krate, &names);
    // `on_cancel = "finish"` runs the body on a task of its own; `transaction = tx` in a
    // transaction, which the body gets as an argument.
    let runner = match (&args.transaction, args.on_cancel) {
        (Some(_), _) => quote!(run_in_transaction),
        (None, Some(OnCancel::Finish)) => quote!(run_to_completion),
        (None, Some(OnCancel::Release) | None) => quote!(run),
    };
    // `run` answers a call it can answer before anything runs (a local hit) at once, in
    // `Ok`, so that no future is polled for it; the others return a future.
    let answers_now = args.transaction.is_none() && args.on_cancel != Some(OnCancel::Finish);
    let params = match &args.transaction {
        Some(tx) => quote!(#tx),
        None => TokenStream::new(),
    };
    let Names {
        call,
        ret: ret_name,
        body: body_name,
        answer,
        rest,
        ..
    } = &names;
    match Shape::of(&item) {
        Ok(Shape::AsyncFn { ret }) => {
            let ret = ret.clone();
            let copies = copies(args, &krate, Some(&ret), &item.sig.generics);
            let block = &item.block;
            // The typed `let` gives the body's `?` and `return` their type, and makes a
            // type error point at the user's return type.
            // Spanned at the return type: an unusable type is reported there, once.
            let run_fn = respan(quote!(#krate::__private::#runner), ret.span());
            // rustc checks the runner's bounds at the type argument and again at the path;
            // under two spans, one missing bound would be reported twice.
            let ret_arg = respan(ret.to_token_stream(), ret.span());
            // Where the answer and the rest are bound, `run`'s bounds are checked once
            // more: spanned (hygiene and all) as the return type, one missing bound is
            // still reported once. Nothing of the user's is named after them.
            let at_ret = |name: &Ident| Ident::new(&name.to_string(), ret.span());
            let (answer, rest) = (at_ret(answer), at_ret(rest));
            let run = match &args.transaction {
                // Boxed, as sqlx's own transactions ask: the body's future borrows the
                // transaction it is given.
                Some(_) => quote_spanned! {ret.span()=>
                    #run_fn::<#ret_arg, _, _>(#call, move |#params| ::std::boxed::Box::pin(async move {
                        let #ret_name: #ret = #block;
                        #[allow(unreachable_code)]
                        #ret_name
                    }))
                    .await
                },
                // Bound by a `let`, not awaited in the `match`: the scrutinee would stay in
                // the function's future across the `.await`, as large again.
                None if answers_now => quote_spanned! {ret.span()=>
                    let #rest = match #run_fn::<#ret_arg, _, _, _, _>(#call, #copies, move || async move {
                        let #ret_name: #ret = #block;
                        #[allow(unreachable_code)]
                        #ret_name
                    }) {
                        ::core::result::Result::Ok(#answer) => return #answer,
                        ::core::result::Result::Err(#rest) => #rest,
                    };
                    #rest.await
                },
                None => quote_spanned! {ret.span()=>
                    #run_fn::<#ret_arg, _, _, _, _>(#call, #copies, move || async move {
                        let #ret_name: #ret = #block;
                        #[allow(unreachable_code)]
                        #ret_name
                    })
                    .await
                },
            };
            *item.block = syn::parse_quote!({ #prelude #run });
        }
        Ok(Shape::BoxedAsyncBlock) => {
            let output = boxed_output(&item.sig.output);
            let boxed_ret = match &output {
                Some(ret) => ret.to_token_stream(),
                None => quote!(_),
            };
            let copies = copies(args, &krate, output.as_ref(), &item.sig.generics);
            if let Some(inner) = boxed_async_block_mut(&mut item.block) {
                let body = &inner.block;
                // `#[async_trait]` rebinds every argument inside its block; one used only
                // by the key (read above, outside) would warn as unused there.
                inner.block = match &args.transaction {
                    // The closure's signature is inferred from the bound of the function
                    // it is first passed to, which only says what it is for a closure
                    // written in place.
                    Some(_) => syn::parse_quote!({
                        #prelude
                        #[allow(unused_variables)]
                        let #body_name = #krate::__private::transaction_body(
                            &#call,
                            move |#params| ::std::boxed::Box::pin(async move #body),
                        );
                        #krate::__private::#runner::<_, _, _>(#call, #body_name).await
                    }),
                    None if answers_now => syn::parse_quote!({
                        #prelude
                        #[allow(unused_variables)]
                        let #body_name = move || async move #body;
                        let #rest = match #krate::__private::#runner::<#boxed_ret, _, _, _, _>(#call, #copies, #body_name) {
                            ::core::result::Result::Ok(#answer) => return #answer,
                            ::core::result::Result::Err(#rest) => #rest,
                        };
                        #rest.await
                    }),
                    None => syn::parse_quote!({
                        #prelude
                        #[allow(unused_variables)]
                        let #body_name = move || async move #body;
                        #krate::__private::#runner::<#boxed_ret, _, _, _, _>(#call, #copies, #body_name).await
                    }),
                };
            }
        }
        Err(e) => return e.to_compile_error(),
    }
    item.into_token_stream()
}

/// How hits get their value: `replay = "clone"` demands a copier (the value must be
/// `Clone + Send + Sync + 'static`), `replay = "decode"` has none, and by default the
/// runtime's `Pick` finds one where the return type is plainly a `'static` type and its
/// value is `Clone`.
///
/// "Plainly": method resolution, which `Pick` relies on, does not see lifetimes, so for a
/// type that may borrow (a lifetime, a reference, `Self`, a type parameter of the
/// function, or a name written like one of an impl's, `T` or `T2`) it would pick the copy
/// and then fail to compile on the `'static` it needs. Those decode, unless told.
fn copies(args: &Args, krate: &Path, ret: Option<&Type>, generics: &syn::Generics) -> TokenStream {
    match (args.replay, ret) {
        (Some(Replay::Decode), _) | (None, None) => quote!(#krate::__private::NoCopies),
        (Some(Replay::Clone), Some(ret)) => {
            let forced = respan(quote!(#krate::__private::clone_copies), ret.span());
            quote!(#forced::<#ret>())
        }
        (Some(Replay::Clone), None) => quote!(#krate::__private::NoCopies),
        (None, Some(ret)) if plainly_static(ret.to_token_stream(), generics) => quote! {{
            #[allow(unused_imports)]
            use #krate::__private::{ViaClone as _, ViaDecode as _};
            (&&#krate::__private::Pick::<#ret>::new()).copies()
        }},
        (None, Some(_)) => quote!(#krate::__private::NoCopies),
    }
}

/// Whether `tokens`, a type, names no lifetime, reference, `Self`, `impl` or `dyn` type,
/// type parameter of the function, or name written like a type parameter (one capital
/// letter, maybe with digits).
fn plainly_static(tokens: TokenStream, generics: &syn::Generics) -> bool {
    tokens.into_iter().all(|tt| match tt {
        proc_macro2::TokenTree::Punct(p) => p.as_char() != '\'' && p.as_char() != '&',
        proc_macro2::TokenTree::Ident(i) => {
            let name = i.to_string();
            let mut chars = name.chars();
            let like_a_parameter = chars.next().is_some_and(|c| c.is_ascii_uppercase())
                && chars.all(|c| c.is_ascii_digit());
            !like_a_parameter
                && !matches!(name.as_str(), "Self" | "impl" | "dyn" | "_")
                && !generics.params.iter().any(|param| match param {
                    syn::GenericParam::Type(t) => t.ident == i,
                    syn::GenericParam::Const(c) => c.ident == i,
                    syn::GenericParam::Lifetime(_) => false,
                })
        }
        proc_macro2::TokenTree::Group(g) => plainly_static(g.stream(), generics),
        proc_macro2::TokenTree::Literal(_) => true,
    })
}

/// `R` in the `Pin<Box<dyn Future<Output = R> + ..>>` that `#[async_trait]` makes a
/// method return, if the return type has that shape.
fn boxed_output(output: &ReturnType) -> Option<Type> {
    let ReturnType::Type(_, ty) = output else {
        return None;
    };
    let arg = |ty: &Type| -> Option<Type> {
        let Type::Path(p) = ty else { return None };
        let last = p.path.segments.last()?;
        let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
            return None;
        };
        args.args.iter().find_map(|a| match a {
            syn::GenericArgument::Type(t) => Some(t.clone()),
            _ => None,
        })
    };
    // Pin<..> holds Box<..>, which holds the trait object.
    let boxed = arg(ty)?;
    let Type::TraitObject(object) = arg(&boxed)? else {
        return None;
    };
    object.bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(t) = bound else {
            return None;
        };
        let last = t.path.segments.last()?;
        if last.ident != "Future" {
            return None;
        }
        let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
            return None;
        };
        args.args.iter().find_map(|a| match a {
            syn::GenericArgument::AssocType(assoc) if assoc.ident == "Output" => {
                Some(assoc.ty.clone())
            }
            _ => None,
        })
    })
}

/// `tokens` with every span set to `span`, so errors inside them point there.
fn respan(tokens: TokenStream, span: proc_macro2::Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tt| {
            if let proc_macro2::TokenTree::Group(g) = &tt {
                let mut group = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                tt = proc_macro2::TokenTree::Group(group);
            } else {
                tt.set_span(span);
            }
            tt
        })
        .collect()
}

/// The statements before the body: engine, key and fingerprint are evaluated once, in
/// statements of their own, so their borrows of the arguments end before the body takes
/// the arguments.
fn prelude(args: &Args, key: &Expr, item: &ItemFn, krate: &Path, names: &Names) -> TokenStream {
    let Names { engine, call, .. } = names;
    let bind_engine = match &args.store {
        Some(store) if store_outlives_body(store, item) => quote_spanned! {store.span()=>
            let #engine = #krate::__private::borrow(#store);
        },
        // The body may take what `store` borrows (`&mut self`, an argument by value):
        // an owned handle (an `Arc` clone) keeps the engine apart from it.
        Some(store) => quote_spanned! {store.span()=>
            let #engine = #krate::__private::engine(#store);
            let #engine = &#engine;
        },
        // Found when the call runs, an owned handle: its block's, or, in a test build of
        // the user's crate (`cfg!(test)` is read there), its runtime's, so that tests
        // keep apart; else the process's.
        None => quote! {
            let #engine = #krate::__private::default_engine(::core::cfg!(test));
            let #engine = &#engine;
        },
    };
    let key_ref = quote_spanned!(key.span()=> &(#key));
    let key_name = Ident::new("__idempotent_key", Span::mixed_site());
    // Spanned at the key, so a key that is not `Display` is reported there.
    let key_arg = Ident::new(
        "__idempotent_key",
        Span::mixed_site().located_at(key.span()),
    );
    let scope = match &args.scope {
        // Checked here already (`args.rs`), and again in a `const`, so that calls need not
        // search it for `|` each time.
        Some(scope) => quote_spanned! {scope.span()=>
            const { #krate::__private::LiteralScope::new(#scope) }
        },
        // A closure written here has a type name that holds the function's path, its
        // generic arguments and its impl's type, read at run time. The arguments of
        // `impl Trait` parameters are cut off: they tell how an input was passed, not
        // which operation runs.
        None => {
            let anonymous = impl_trait_arguments(item);
            quote!(#krate::__private::default_scope(&|| (), #anonymous))
        }
    };
    let mut settings = TokenStream::new();
    if let Some(ttl) = args.ttl {
        let (s, n) = (ttl.as_secs(), ttl.subsec_nanos());
        settings.extend(quote!(.ttl(::core::time::Duration::new(#s, #n))));
    }
    if let Some(lease) = args.lease {
        let (s, n) = (lease.as_secs(), lease.subsec_nanos());
        settings.extend(quote!(.lease(::core::time::Duration::new(#s, #n))));
    }
    match args.concurrent {
        Some(Concurrent::Reject) => {
            settings.extend(quote!(.concurrency(#krate::Concurrency::Reject)))
        }
        Some(Concurrent::Wait) => settings.extend(quote!(.concurrency(#krate::Concurrency::Wait))),
        None => {}
    }
    let fingerprint = args.fingerprint.as_ref().map(|fp| {
        let value = quote_spanned!(fp.span()=> #krate::__private::fingerprint(&(#fp)));
        quote!(let #call = #krate::__private::with_fingerprint(#call, #value);)
    });
    let store_errors = args
        .cache_errors
        .then(|| quote!(let #call = #call.store_errors();));
    let call_fn = match &args.on_missing_key {
        None => quote!(call),
        Some(_) => quote!(call_present),
    };
    let keyed_call = quote! {
        #krate::__private::#call_fn(#engine, #scope, #key_arg, {
            #[allow(unused_imports)]
            use #krate::__private::{ViaDisplay as _, ViaStr as _};
            (&&#krate::__private::KeyPick(#key_name)).text()
        })
    };
    // Evaluated once; a temporary it makes (`order.id.clone()`) is dropped at the end of
    // the block, not held across the body's awaits.
    let make_call = match &args.on_missing_key {
        None => quote! {
            let #key_name = #key_ref;
            #keyed_call
        },
        Some((missing, lit)) => {
            let missing = match missing {
                MissingKey::Run => quote!(Run),
                MissingKey::Fail => quote!(Fail),
            };
            let optional = respan(quote!(#krate::__private::optional_key), key.span());
            let without = respan(quote!(#krate::__private::call_without_key), lit.span());
            // One span for the whole match: rustc checks `OptionalKey` at the call and at
            // the pattern, and reports a key that is not an `Option` once per span.
            quote_spanned! {key.span()=>
                match #optional(#key_ref) {
                    ::core::option::Option::Some(#key_name) => { #keyed_call }
                    ::core::option::Option::None => #without(
                        #engine,
                        #krate::__private::MissingKey::#missing,
                    ),
                }
            }
        }
    };
    quote! {
        #bind_engine
        let #call = { #make_call }
        #settings;
        #fingerprint
        #store_errors
    }
}

/// How many generic arguments the function's type name prints last for its `impl Trait`
/// arguments (one for each `impl`, however deep in an argument's type).
fn impl_trait_arguments(item: &ItemFn) -> usize {
    item.sig
        .inputs
        .iter()
        .map(|input| match input {
            syn::FnArg::Typed(arg) => count_impl(arg.ty.to_token_stream()),
            syn::FnArg::Receiver(_) => 0,
        })
        .sum()
}

/// How many `impl` keywords `tokens` hold, at any depth: each `impl Trait` in an
/// argument's type is one more generic parameter.
fn count_impl(tokens: TokenStream) -> usize {
    tokens
        .into_iter()
        .map(|tt| match tt {
            proc_macro2::TokenTree::Ident(i) if i == "impl" => 1,
            proc_macro2::TokenTree::Group(g) => count_impl(g.stream()),
            _ => 0,
        })
        .sum()
}

/// Whether the engine `store` names can stay borrowed while the body runs: it is reached
/// through `&self`, through an argument that is a shared reference, or through a static.
/// Anything else (`&mut self`, `self` by value, an argument by value, an expression this
/// cannot follow) may be moved or mutably borrowed by the body.
fn store_outlives_body(store: &Expr, item: &ItemFn) -> bool {
    let Some(root) = root_of(store) else {
        return false;
    };
    let Some(ident) = root.get_ident() else {
        // A path of several segments: a static or a function, not an argument.
        return true;
    };
    let mut all_args_named = true;
    for input in &item.sig.inputs {
        match input {
            syn::FnArg::Receiver(r) if ident == "self" => {
                return r.reference.is_some() && r.mutability.is_none() && r.colon_token.is_none();
            }
            syn::FnArg::Receiver(_) => {}
            syn::FnArg::Typed(arg) => match &*arg.pat {
                syn::Pat::Ident(p) if p.ident == *ident => {
                    return matches!(&*arg.ty, Type::Reference(r) if r.mutability.is_none());
                }
                syn::Pat::Ident(_) => {}
                _ => all_args_named = false,
            },
        }
    }
    // Not an argument: a static or constant, unless a pattern argument bound it.
    all_args_named && ident != "self"
}

/// The path an expression reads through: `&self.idem` and `&*ENGINE` are rooted at
/// `self` and `ENGINE`. `None` where it is not a chain of fields, derefs and indexing:
/// a method call's result may borrow its arguments too.
fn root_of(expr: &Expr) -> Option<&Path> {
    match expr {
        Expr::Reference(e) => root_of(&e.expr),
        Expr::Unary(e) if matches!(e.op, syn::UnOp::Deref(_)) => root_of(&e.expr),
        Expr::Field(e) => root_of(&e.base),
        Expr::Paren(e) => root_of(&e.expr),
        Expr::Index(e) => root_of(&e.expr),
        Expr::Path(e) if e.qself.is_none() => Some(&e.path),
        _ => None,
    }
}
