//! The conformance suite against the etcd backend, each case on its own real three-member etcd
//! cluster on loopback ports.

flotilla_store::conformance_suite!(flotilla_store::conformance::etcd());
