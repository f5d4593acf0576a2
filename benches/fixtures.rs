//! A large configuration for benches: 100,000 users and 10,000 CIDR ranges.
#![allow(dead_code)]

use std::fmt::Write;
use std::path::Path;

use mediaroute::config::{self, Config};

/// Config text with `users` users (modes cycling no/yes/auto) and `ranges` ranges,
/// three quarters IPv4 /24s spread over 10.0.0.0/8, one quarter IPv6 /48s.
pub fn big_config_text(users: usize, ranges: usize) -> String {
    let mut s = String::from(
        "[listen]\naddr = \"127.0.0.1:0\"\n[identity]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         [primary]\nurl = \"http://127.0.0.1:9001\"\n[replica]\nurl = \"http://127.0.0.1:9002\"\n\
         [replication]\ndelay = \"15m\"\nnetworks = [\n",
    );
    for i in 0..ranges {
        if i % 4 == 3 {
            let _ = writeln!(s, "  \"2001:db8:{:x}::/48\",", i);
        } else {
            // Every other /24 of 10.x.y.0, so lookups between ranges miss.
            let n = i * 2;
            let _ = writeln!(s, "  \"10.{}.{}.0/24\",", (n >> 8) & 0xff, n & 0xff);
        }
    }
    s.push_str("]\n[users]\n");
    for i in 0..users {
        let mode = ["no", "yes", "auto"][i % 3];
        let _ = writeln!(s, "user{i:06} = \"{mode}\"");
    }
    s
}

/// The parsed big config.
pub fn big_config(users: usize, ranges: usize) -> Config {
    let text = big_config_text(users, ranges);
    config::parse(Path::new("bench.toml"), &text, &|_| Ok(String::new())).expect("bench config is valid")
}
