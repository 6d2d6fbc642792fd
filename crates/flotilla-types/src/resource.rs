//! What every kind is: the `Resource` trait, `define_kind!`, and strict decoding with field paths.

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::meta::ObjectMeta;
use crate::validation::FieldErrors;

pub const GROUP: &str = "flotilla.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "flotilla.dev/v1alpha1";

/// A column of the CLI's tables: a dotted path into the object.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub name: &'static str,
    pub path: &'static str,
    /// Shown only with `-o wide`.
    pub wide: bool,
    /// The value is a time, shown as the age since then (`5m`).
    pub age: bool,
}

/// Semantic checks beyond what the types enforce. `path` is where the value sits (`spec`).
pub trait Validate {
    fn validate(&self, path: &str, errs: &mut FieldErrors);
}

pub trait Resource:
    Serialize + DeserializeOwned + JsonSchema + Clone + Send + Sync + 'static
{
    const KIND: &'static str;
    const PLURAL: &'static str;
    const SINGULAR: &'static str;
    const SHORT_NAMES: &'static [&'static str];
    /// Project-scoped (true) or cluster-scoped (false).
    const NAMESPACED: bool;
    /// The group/version that serves the kind: Flotilla's own, or `v1` (Kubernetes' core group,
    /// at `/api/v1`) for the kinds Kubernetes clients look for there (Event).
    const API_VERSION: &'static str = API_VERSION;
    /// Whether the kind has a status written through the `/status` subresource.
    const HAS_STATUS: bool = true;
    /// Fields usable in `fieldSelector` besides `metadata.name` and `metadata.namespace`.
    const FIELD_SELECTORS: &'static [&'static str];
    const COLUMNS: &'static [Column];
    /// Spec fields (dotted paths below `spec`) that, once set, stay: an update that omits one
    /// keeps the stored value, and one that changes it is refused. `spec.nodeName` is the VM's
    /// binding: re-applying a manifest written before the scheduler placed it must not unbind it.
    const SET_ONCE: &'static [&'static str] = &[];

    fn metadata(&self) -> &ObjectMeta;
    fn metadata_mut(&mut self) -> &mut ObjectMeta;
    fn validate(&self, errs: &mut FieldErrors);
}

/// Defines a kind's object type: `apiVersion`, `kind`, `metadata`, `spec` and optional `status`.
#[macro_export]
macro_rules! define_kind {
    (
        $(#[$doc:meta])*
        $kind:ident {
            spec: $spec:ty $(, spec_default: $spec_default:tt)?,
            status: $status:ty,
            plural: $plural:literal,
            singular: $singular:literal,
            short_names: [$($short:literal),*],
            namespaced: $namespaced:literal,
            field_selectors: [$($field:literal),*],
            columns: [$($col:literal => $path:literal $(($wide:ident))?),*]
            $(, set_once: [$($once:literal),*])? $(,)?
        }
    ) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $kind {
            /// flotilla.dev/v1alpha1
            #[serde(default = "crate::resource::api_version")]
            pub api_version: String,
            /// The object's kind (the type's name, e.g. VirtualMachine).
            #[serde(default)]
            pub kind: String,
            /// Name, project, labels, annotations and what the server keeps about the object.
            pub metadata: $crate::meta::ObjectMeta,
            $(#[serde(default)] #[doc = concat!("defaults: ", stringify!($spec_default))])?
            /// What the object should be: written by its users.
            pub spec: $spec,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            /// What the object is: written by controllers and agents (the status subresource).
            pub status: Option<$status>,
        }

        impl $kind {
            pub fn new(metadata: $crate::meta::ObjectMeta, spec: $spec) -> Self {
                $kind {
                    api_version: $crate::resource::API_VERSION.to_string(),
                    kind: stringify!($kind).to_string(),
                    metadata,
                    spec,
                    status: None,
                }
            }
        }

        impl $crate::resource::Resource for $kind {
            const KIND: &'static str = stringify!($kind);
            const PLURAL: &'static str = $plural;
            const SINGULAR: &'static str = $singular;
            const SHORT_NAMES: &'static [&'static str] = &[$($short),*];
            const NAMESPACED: bool = $namespaced;
            const FIELD_SELECTORS: &'static [&'static str] = &[$($field),*];
            const COLUMNS: &'static [$crate::resource::Column] =
                &[$($crate::resource::Column { name: $col, path: $path, wide: $crate::define_kind!(@wide $($wide)?), age: false }),*];
            $(const SET_ONCE: &'static [&'static str] = &[$($once),*];)?

            fn metadata(&self) -> &$crate::meta::ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut $crate::meta::ObjectMeta {
                &mut self.metadata
            }

            fn validate(&self, errs: &mut $crate::validation::FieldErrors) {
                $crate::resource::Validate::validate(&self.spec, "spec", errs);
                if let Some(status) = &self.status {
                    $crate::resource::Validate::validate(status, "status", errs);
                }
            }
        }
    };
    (@wide wide) => { true };
    (@wide) => { false };
}

pub(crate) fn api_version() -> String {
    API_VERSION.to_string()
}

/// Decodes an object strictly (unknown fields, wrong types and arrays for objects are errors
/// naming their path), then runs every semantic check.
pub fn decode<T: Resource>(value: &serde_json::Value) -> Result<T, FieldErrors> {
    let object: T =
        serde_path_to_error::deserialize(crate::strict::Strict(value)).map_err(|e| {
            let mut errs = FieldErrors::default();
            let path = e.path().to_string();
            let message = e.inner().to_string();
            let path = if path == "." { String::new() } else { path };
            // serde names a missing field in its message; make it part of the path.
            match message
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next())
            {
                Some(field) => {
                    let full = if path.is_empty() {
                        field.to_string()
                    } else {
                        format!("{path}.{field}")
                    };
                    errs.push(full, "is required");
                }
                None => errs.push(path, message),
            }
            errs
        })?;
    let mut errs = FieldErrors::default();
    object.metadata().validate(&mut errs);
    object.validate(&mut errs);
    errs.into_result().map(|_| object)
}
