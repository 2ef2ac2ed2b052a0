//! The messages and service traits generated from `proto/` by `build.rs`, in modules named after
//! their packages (the generated code refers to other packages by relative paths).

#![allow(clippy::all, clippy::pedantic)]

pub mod event_store {
    pub mod client {
        tonic::include_proto!("event_store.client");

        pub mod streams {
            tonic::include_proto!("event_store.client.streams");
        }
        pub mod persistent_subscriptions {
            tonic::include_proto!("event_store.client.persistent_subscriptions");
        }
        pub mod server_features {
            tonic::include_proto!("event_store.client.server_features");
        }
        pub mod gossip {
            tonic::include_proto!("event_store.client.gossip");
        }
        pub mod operations {
            tonic::include_proto!("event_store.client.operations");
        }
        pub mod projections {
            tonic::include_proto!("event_store.client.projections");
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}
