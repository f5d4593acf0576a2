//! mediaroute's own AWS credentials, loaded off the request path and refreshed before
//! they expire (README "Authentication").
