//! `--key value` and `--flag` arguments, with defaults and clear errors.

use std::collections::HashMap;
use std::str::FromStr;

/// Parsed arguments.
pub struct Args {
    values: HashMap<String, String>,
    flags: Vec<String>,
}

impl Args {
    /// Parses `std::env::args()`. `flags` are options without a value. `--help` prints `usage`
    /// and exits.
    pub fn parse(usage: &str, flags: &[&str]) -> Args {
        let mut values = HashMap::new();
        let mut seen_flags = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            if a == "--help" || a == "-h" {
                println!("{usage}");
                std::process::exit(0);
            }
            let Some(key) = a.strip_prefix("--") else {
                die(usage, &format!("unexpected argument '{a}'"));
            };
            if flags.contains(&key) {
                seen_flags.push(key.to_string());
                continue;
            }
            match it.next() {
                Some(v) => {
                    values.insert(key.to_string(), v);
                }
                None => die(usage, &format!("--{key} needs a value")),
            }
        }
        Args {
            values,
            flags: seen_flags,
        }
    }

    /// The value of `--key`, parsed, or `default`.
    pub fn get<T: FromStr>(&self, key: &str, default: T) -> T {
        match self.values.get(key) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("error: --{key}: cannot parse '{v}'");
                std::process::exit(2)
            }),
        }
    }

    /// The value of `--key` as a string, if given.
    pub fn opt(&self, key: &str) -> Option<String> {
        self.values.get(key).cloned()
    }

    /// Whether `--flag` was given.
    pub fn flag(&self, key: &str) -> bool {
        self.flags.iter().any(|f| f == key)
    }
}

fn die(usage: &str, msg: &str) -> ! {
    eprintln!("error: {msg}\n\n{usage}");
    std::process::exit(2)
}
