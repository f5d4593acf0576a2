//! SigV4 for the replica (README "Authentication"): a download the primary allowed is
//! signed anew with mediaroute's own credentials for the replica's host, region and bucket.

pub mod credentials;
