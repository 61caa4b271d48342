//! Trees in Rhai's form. `LocalEnvironment`, and a JSON `Root.Body` a script has written, are
//! kept as Rhai values ([`Dynamic`]) so that a Compute or Filter script takes them and hands
//! them back without converting every key and string to serde_json and back (a message whose
//! script changes one field used to pay for the whole tree twice). Only the JSON twins are
//! kept in a tree: unit, bool, INT, FLOAT, string, array and map; the script nodes convert
//! anything else (a char, a blob inside a tree) on the way out, or refuse it.

use std::borrow::Cow;
use std::fmt;

use rhai::{Dynamic, Map as RMap};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// serde_json → Rhai, directly (no serde round trip: this runs for every message). Numbers
/// convert as Rhai's serde support converts them: an integer that fits `i64` to INT, any other
/// number to FLOAT.
pub fn to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(rhai::ImmutableString::from(s.as_str())),
        Value::Array(a) => Dynamic::from_array(a.iter().map(to_dynamic).collect()),
        Value::Object(o) => map_to_dynamic(o),
    }
}

/// Parses a JSON document straight into Rhai's form, the way [`to_dynamic`] converts the
/// parsed value, but refusing (an error) a number Rhai cannot hold exactly: an integer above
/// `i64::MAX` (Rhai's serde support would make it a float). Callers fall back to serde_json's
/// `Value` for those, and for the precise message of a syntax error.
pub fn from_json_slice(bytes: &[u8]) -> Result<Dynamic, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let d = de.deserialize_any(Exact)?;
    de.end()?;
    Ok(d)
}

/// The visitor of [`from_json_slice`].
struct Exact;

impl<'de> Visitor<'de> for Exact {
    type Value = Dynamic;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Dynamic, E> {
        Ok(Dynamic::from_bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Dynamic, E> {
        Ok(Dynamic::from_int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dynamic, E> {
        i64::try_from(v)
            .map(Dynamic::from_int)
            .map_err(|_| E::custom("an integer above i64::MAX"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Dynamic, E> {
        Ok(Dynamic::from_float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Dynamic, E> {
        Ok(Dynamic::from(rhai::ImmutableString::from(v)))
    }
    fn visit_string<E>(self, v: String) -> Result<Dynamic, E> {
        Ok(Dynamic::from(rhai::ImmutableString::from(v)))
    }
    fn visit_unit<E>(self) -> Result<Dynamic, E> {
        Ok(Dynamic::UNIT)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Dynamic, A::Error> {
        let mut a = rhai::Array::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element_seed(ExactSeed)? {
            a.push(v);
        }
        Ok(Dynamic::from_array(a))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Dynamic, A::Error> {
        let mut m = RMap::new();
        while let Some(Key(k)) = map.next_key()? {
            let v = map.next_value_seed(ExactSeed)?;
            m.insert(k.as_ref().into(), v);
        }
        Ok(Dynamic::from_map(m))
    }
}

struct ExactSeed;

impl<'de> de::DeserializeSeed<'de> for ExactSeed {
    type Value = Dynamic;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Dynamic, D::Error> {
        d.deserialize_any(Exact)
    }
}

/// A map key, borrowed from the input when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A serde_json object as a Rhai map.
pub fn map_to_dynamic(o: &Map<String, Value>) -> Dynamic {
    let mut m = RMap::new();
    for (k, v) in o {
        m.insert(k.as_str().into(), to_dynamic(v));
    }
    Dynamic::from_map(m)
}

/// Rhai → serde_json, copying (for readers: traces, the publish node's overrides, tests). A
/// float with no JSON form (NaN, the infinities) becomes `null`, as serde_json writes it; a
/// value without a JSON twin (which a tree does not hold, see the module) is written as Rhai's
/// serde support writes it.
pub fn to_value(d: &Dynamic) -> Value {
    if d.is_shared() {
        return to_value(&d.flatten_clone());
    }
    // Type tests first: a failed `as_*` builds a type name.
    if d.is_string() {
        if let Ok(s) = d.as_immutable_string_ref() {
            return Value::String(s.as_str().to_owned());
        }
    } else if d.is_int() {
        return Value::from(d.as_int().unwrap_or_default());
    } else if d.is_map() {
        if let Ok(m) = d.as_map_ref() {
            return Value::Object(
                m.iter()
                    .map(|(k, v)| (k.to_string(), to_value(v)))
                    .collect(),
            );
        }
    } else if d.is_bool() {
        return Value::Bool(d.as_bool().unwrap_or_default());
    } else if d.is_float() {
        let f = d.as_float().unwrap_or(f64::NAN);
        return serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number);
    } else if d.is_unit() {
        return Value::Null;
    } else if d.is_array() {
        if let Ok(a) = d.as_array_ref() {
            return Value::Array(a.iter().map(to_value).collect());
        }
    }
    serde_json::to_value(d).unwrap_or(Value::Null)
}

/// Sets `<path...>` in a map tree to `value`, creating (or replacing non-map values with) maps
/// on the way. An empty path replaces the tree.
pub fn set_path(tree: &mut Dynamic, path: &[&str], value: Dynamic) {
    let Some((first, rest)) = path.split_first() else {
        *tree = value;
        return;
    };
    if tree.is_shared() {
        *tree = std::mem::take(tree).flatten();
    }
    if !tree.is_map() {
        *tree = Dynamic::from_map(RMap::new());
    }
    let Ok(mut m) = tree.as_map_mut() else {
        unreachable!("made a map just above")
    };
    if rest.is_empty() {
        m.insert((*first).into(), value);
        return;
    }
    // Looked up before inserting: the names exist on all but the first call.
    if let Some(child) = m.get_mut(*first) {
        return set_path(child, rest, value);
    }
    let mut child = Dynamic::from_map(RMap::new());
    set_path(&mut child, rest, value);
    m.insert((*first).into(), child);
}

/// The value at `<path...>` in a map tree (a copy), if every step is a map that has the next
/// name.
pub fn get_path(tree: &Dynamic, path: &[&str]) -> Option<Value> {
    with_path(tree, path, |d| d.map(to_value))
}

/// Calls `f` with the value at `<path...>` in a map tree, borrowed (`None` if a step is
/// missing or not a map): for readers on the per-message path, which need no copy.
pub fn with_path<R>(tree: &Dynamic, path: &[&str], f: impl FnOnce(Option<&Dynamic>) -> R) -> R {
    let Some((first, rest)) = path.split_first() else {
        return f(Some(tree));
    };
    match tree.read_lock::<RMap>() {
        Some(m) => match m.get(*first) {
            Some(child) => with_path(child, rest, f),
            None => f(None),
        },
        None => f(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_go_to_rhai_and_back_unchanged() {
        let v = json!({
            "i": -5, "f": 1.5, "s": "é\"", "n": null, "b": true,
            "a": [1, [2], {"k": "v"}], "o": {}
        });
        assert_eq!(to_value(&to_dynamic(&v)), v);
        // Rhai has one integer type: a u64 over i64::MAX becomes a float, as in Rhai's serde.
        let big = json!(18_446_744_073_709_551_615u64);
        assert_eq!(
            to_value(&to_dynamic(&big)),
            json!(18_446_744_073_709_551_615u64 as f64)
        );
        assert_eq!(to_value(&Dynamic::from_float(f64::NAN)), Value::Null);
        assert_eq!(to_value(&Dynamic::from_char('x')), json!("x"));
    }

    #[test]
    fn json_parses_straight_into_rhai_as_the_conversion_would() {
        let text = r#"{"i": -5, "u": 9223372036854775807, "f": 1.5, "e": 2e3, "s": "a\\\"\u00e9",
            "esc\"aped": 1, "n": null, "b": false, "a": [1, [2], {"k": "v"}], "o": {}, "d": 1, "d": 2}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        let d = from_json_slice(text.as_bytes()).unwrap();
        assert_eq!(format!("{d:?}"), format!("{:?}", to_dynamic(&v)));
        assert_eq!(
            serde_json::to_vec(&d).unwrap(),
            serde_json::to_vec(&v).unwrap()
        );
        // Refused: what Rhai cannot hold exactly, and what is not JSON.
        assert!(from_json_slice(b"[9223372036854775808]").is_err());
        assert!(from_json_slice(b"{\"a\": 1,").is_err());
        assert!(from_json_slice(b"1 2").is_err());
    }

    #[test]
    fn paths_are_set_and_read_through_maps() {
        let mut t = to_dynamic(&json!({"a": {"keep": 1}, "s": "not a map"}));
        set_path(&mut t, &["a", "b", "c"], Dynamic::from_int(2));
        set_path(&mut t, &["s", "x"], Dynamic::TRUE);
        assert_eq!(
            to_value(&t),
            json!({"a": {"keep": 1, "b": {"c": 2}}, "s": {"x": true}})
        );
        assert_eq!(get_path(&t, &["a", "b"]), Some(json!({"c": 2})));
        assert_eq!(get_path(&t, &["a", "keep", "deeper"]), None);
        assert_eq!(get_path(&t, &["missing"]), None);
        set_path(&mut t, &[], Dynamic::UNIT);
        assert_eq!(to_value(&t), Value::Null);
    }
}
