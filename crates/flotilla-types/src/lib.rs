//! Flotilla's resource model: the kinds, their metadata and validation, selectors, and the
//! `Status` object errors are reported with. Shared by the server, the client and the agents.

pub mod clientconfig;
pub mod join_token;
pub mod kinds;
pub mod meta;
pub mod quantity;
pub mod registry;
pub mod resource;
pub mod selector;
pub mod status;
pub mod strict;
pub mod table;
pub mod validation;

pub use kinds::*;
pub use meta::{Condition, ConditionStatus, ObjectMeta, OwnerReference, Time};
pub use quantity::Quantity;
pub use registry::{KindInfo, KINDS};
pub use resource::{decode, Column, Resource, API_VERSION, GROUP, VERSION};
pub use status::Status;
pub use validation::{FieldError, FieldErrors};
