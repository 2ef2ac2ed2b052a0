//! `#[projection]` and `#[sharder]`: turn a plain function into a Refract WebAssembly component.
//!
//! The expansion generates the component bindings in the user's crate (so a crate carries only
//! the world it implements) and wires them to `refract_guest`'s typed layer.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{format_ident, quote};
use syn::parse::Parser;
use syn::{Expr, ExprArray, FnArg, ItemFn, Lit, LitStr, Path, Type, parse_macro_input};

/// The SDK's WIT package, which travels inside this crate, by absolute path: the bindings match
/// the SDK's version exactly, and a `wit/` folder of the user's crate is not mixed in.
const WIT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/wit");

/// Marks `fn(state: &mut S, event: &Event, ctx: &mut Ctx) -> anyhow::Result<()>` as the
/// projection of this crate. See the `refract_guest` documentation for the arguments.
#[proc_macro_attribute]
pub fn projection(args: TokenStream, item: TokenStream) -> TokenStream {
    let function = parse_macro_input!(item as ItemFn);
    match expand_projection(args.into(), &function) {
        Ok(tokens) => tokens.into(),
        Err(error) => {
            let error = error.to_compile_error();
            quote!(#function #error).into()
        }
    }
}

/// Marks `fn(event: &Event, shards: u32) -> u32` as the sharder of this crate.
#[proc_macro_attribute]
pub fn sharder(args: TokenStream, item: TokenStream) -> TokenStream {
    let function = parse_macro_input!(item as ItemFn);
    if !args.is_empty() {
        let error = syn::Error::new(
            proc_macro2::Span::call_site(),
            "#[sharder] takes no arguments",
        )
        .to_compile_error();
        return quote!(#function #error).into();
    }
    let name = &function.sig.ident;
    let bindings = bindings("sharder");
    let event = event_conversion();
    quote! {
        #function

        #[doc(hidden)]
        #[allow(clippy::all)] // Generated bindings.
        mod __refract_sharder {
            #bindings

            #event

            struct Component;

            impl Guest for Component {
                fn shard(events: ::std::vec::Vec<Event>, shards: u32) -> ::std::vec::Vec<u32> {
                    ::refract_guest::__private::shard(
                        events.into_iter().map(event),
                        shards,
                        super::#name,
                    )
                }
            }

            export!(Component);
        }
    }
    .into()
}

fn bindings(world: &str) -> Tokens {
    quote! {
        ::refract_guest::__private::wit_bindgen::generate!({
            path: #WIT_DIR,
            world: #world,
            runtime_path: "::refract_guest::__private::wit_bindgen::rt",
        });
    }
}

/// `fn event`: the generated binding's event as the SDK's (fields move, nothing is copied).
fn event_conversion() -> Tokens {
    quote! {
        fn event(event: Event) -> ::refract_guest::Event {
            ::refract_guest::Event {
                stream: event.stream,
                revision: event.revision,
                position: event.position,
                id: event.id,
                event_type: event.event_type,
                data: event.data,
                metadata: event.metadata,
                created_ms: event.created_ms,
            }
        }
    }
}

#[derive(Default)]
struct ProjectionArgs {
    source: Option<Tokens>,
    event_types: Vec<LitStr>,
    partitioning: Option<Tokens>,
}

fn strings(value: &Expr) -> syn::Result<Vec<LitStr>> {
    match value {
        Expr::Array(ExprArray { elems, .. }) => elems.iter().map(string).collect(),
        other => Ok(vec![string(other)?]),
    }
}

fn string(value: &Expr) -> syn::Result<LitStr> {
    match value {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(text),
            ..
        }) => Ok(text.clone()),
        other => Err(syn::Error::new_spanned(other, "expected a string literal")),
    }
}

fn expand_projection(args: Tokens, function: &ItemFn) -> syn::Result<Tokens> {
    let mut parsed = ProjectionArgs::default();
    let set_source = |parsed: &mut ProjectionArgs, span: &dyn quote::ToTokens, source| {
        if parsed.source.replace(source).is_some() {
            return Err(syn::Error::new_spanned(span, "the source is given twice"));
        }
        Ok(())
    };
    let parser = syn::meta::parser(|meta| {
        let key = meta.path.clone();
        let name = key.get_ident().map(ToString::to_string).unwrap_or_default();
        match name.as_str() {
            "all" => set_source(&mut parsed, &key, quote!(wit::Source::All)),
            "category" | "categories" | "stream" | "streams" => {
                let values = strings(&meta.value()?.parse::<Expr>()?)?;
                let list = quote!(::std::vec![#(::std::string::String::from(#values)),*]);
                let source = if name.starts_with("categor") {
                    quote!(wit::Source::Categories(#list))
                } else {
                    quote!(wit::Source::Streams(#list))
                };
                set_source(&mut parsed, &key, source)
            }
            "event_types" => {
                parsed.event_types = strings(&meta.value()?.parse::<Expr>()?)?;
                Ok(())
            }
            "partition" => {
                let value = meta.value()?.parse::<LitStr>()?;
                let partitioning = match value.value().as_str() {
                    "none" => quote!(::refract_guest::__private::Partitioning::None),
                    "stream" => quote!(::refract_guest::__private::Partitioning::ByStream),
                    _ => {
                        return Err(syn::Error::new_spanned(
                            value,
                            "partition is \"none\" or \"stream\"; use partition_by = function for a key of your own",
                        ));
                    }
                };
                parsed.partitioning = Some(partitioning);
                Ok(())
            }
            "partition_by" => {
                let function: Path = meta.value()?.parse()?;
                parsed.partitioning = Some(
                    quote!(::refract_guest::__private::Partitioning::Custom(super::#function)),
                );
                Ok(())
            }
            _ => Err(meta.error(
                "expected all, category, categories, stream, streams, event_types, partition or partition_by",
            )),
        }
    });
    parser.parse2(args)?;

    let state = state_type(function)?;
    let name = &function.sig.ident;
    let source = parsed.source.unwrap_or(quote!(wit::Source::All));
    let partitioning = parsed
        .partitioning
        .unwrap_or(quote!(::refract_guest::__private::Partitioning::None));
    let wit_partitioning = quote! {
        match PARTITIONING {
            ::refract_guest::__private::Partitioning::None => wit::Partitioning::None,
            ::refract_guest::__private::Partitioning::ByStream => wit::Partitioning::ByStream,
            ::refract_guest::__private::Partitioning::Custom(_) => wit::Partitioning::Custom,
        }
    };
    let event_types = &parsed.event_types;
    let bindings = bindings("projection");
    let event = event_conversion();
    let state_alias = format_ident!("__RefractState");
    Ok(quote! {
        #function

        #[doc(hidden)]
        type #state_alias = #state;

        #[doc(hidden)]
        #[allow(clippy::all)] // Generated bindings.
        mod __refract_projection {
            #bindings

            use refract::projection::host;
            use refract::projection::types as wit;

            const PARTITIONING: ::refract_guest::__private::Partitioning = #partitioning;

            struct Host;

            impl ::refract_guest::__private::HostApi for Host {
                fn get_state(&self, partition: &str) -> ::std::option::Option<::std::vec::Vec<u8>> {
                    host::get_state(partition)
                }
                fn set_state(&self, partition: &str, state: &[u8]) {
                    host::set_state(partition, state)
                }
                fn table_get(&self, table: &str, key: &str) -> ::std::option::Option<::std::vec::Vec<u8>> {
                    host::table_get(table, key)
                }
                fn table_put(&self, table: &str, key: &str, value: &[u8]) {
                    host::table_put(table, key, value)
                }
                fn table_delete(&self, table: &str, key: &str) {
                    host::table_delete(table, key)
                }
                fn may_emit(&self) -> bool {
                    host::may_emit()
                }
                fn emit(&self, stream: &str, event_type: &str, data: &[u8], metadata: &[u8])
                    -> ::std::result::Result<(), ::std::string::String> {
                    host::emit(stream, event_type, data, metadata)
                }
                fn link_to(&self, stream: &str, position: u64) -> ::std::result::Result<(), ::std::string::String> {
                    host::link_to(stream, position)
                }
                fn caused_by(&self, position: u64) {
                    host::caused_by(position)
                }
                fn log(&self, message: &str) {
                    host::log(message)
                }
            }

            #event

            struct Component;

            impl Guest for Component {
                fn describe() -> Info {
                    Info {
                        source: #source,
                        event_types: ::std::vec![#(::std::string::String::from(#event_types)),*],
                        partitioning: #wit_partitioning,
                    }
                }

                fn partition_key(e: Event) -> ::std::option::Option<::std::string::String> {
                    PARTITIONING.key(&event(e))
                }

                fn handle(events: ::std::vec::Vec<Event>) -> ::std::result::Result<(), ::std::string::String> {
                    ::refract_guest::__private::forward_panics(|message| host::log(message));
                    ::refract_guest::__private::handle::<super::#state_alias>(
                        &Host,
                        events.into_iter().map(event),
                        PARTITIONING,
                        super::#name,
                    )
                }
            }

            export!(Component);
        }
    })
}

/// `S` from the first parameter, `state: &mut S`.
fn state_type(function: &ItemFn) -> syn::Result<Type> {
    let error = || {
        syn::Error::new_spanned(
            &function.sig,
            "a projection is fn(state: &mut State, event: &Event, ctx: &mut Ctx) -> anyhow::Result<()>",
        )
    };
    if function.sig.inputs.len() != 3 {
        return Err(error());
    }
    match function.sig.inputs.first() {
        Some(FnArg::Typed(argument)) => match &*argument.ty {
            Type::Reference(reference) if reference.mutability.is_some() => {
                Ok((*reference.elem).clone())
            }
            _ => Err(error()),
        },
        _ => Err(error()),
    }
}
