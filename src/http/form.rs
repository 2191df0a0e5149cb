//! `application/x-www-form-urlencoded` bodies, decoded exactly as
//! [`url::form_urlencoded::parse`] does, with one fast path: a name or value
//! with no `%` and no `+` is borrowed from the body after one UTF-8 check.
//!
//! The subject token is ~1.5 KB of base64url that never needs decoding; the
//! crate's percent-decoder and lossy UTF-8 pass over it cost ~5% of a core
//! at peak (perf, BENCHMARKS.md). The scans for `&`, `=`, `%` and `+` use
//! `memchr`'s vector search: byte-at-a-time loops over the token were
//! still ~2% of the core (session 8).

use std::borrow::Cow;

/// The body's `name=value` pairs, in order, empty pairs skipped.
pub fn pairs(body: &[u8]) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    let mut rest = Some(body);
    std::iter::from_fn(move || {
        let remaining = rest?;
        Some(match memchr::memchr(b'&', remaining) {
            Some(i) => {
                rest = Some(&remaining[i + 1..]);
                &remaining[..i]
            }
            None => {
                rest = None;
                remaining
            }
        })
    })
    .filter(|pair| !pair.is_empty())
    .map(|pair| {
        let (name, value) = match memchr::memchr(b'=', pair) {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        (decode(name), decode(value))
    })
}

fn decode(bytes: &[u8]) -> Cow<'_, str> {
    if memchr::memchr2(b'%', b'+', bytes).is_none()
        && let Ok(s) = std::str::from_utf8(bytes)
    {
        return Cow::Borrowed(s);
    }
    // The general case, by the crate: `+` is a space, `%XX` a byte, and
    // invalid UTF-8 becomes U+FFFD. Its parser decodes a lone `a=b` pair;
    // an empty name keeps the pair (`=x`), so name the value `v`.
    let mut input = Vec::with_capacity(bytes.len() + 2);
    input.extend_from_slice(b"v=");
    input.extend_from_slice(bytes);
    url::form_urlencoded::parse(&input)
        .next()
        .map(|(_, v)| Cow::Owned(v.into_owned()))
        .unwrap_or(Cow::Borrowed(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_pairs(body: &[u8]) -> Vec<(String, String)> {
        url::form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    fn ours(body: &[u8]) -> Vec<(String, String)> {
        pairs(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    #[test]
    fn decodes_exactly_as_the_crate_does() {
        let cases: &[&[u8]] = &[
            b"",
            b"&&&",
            b"a=b",
            b"a=b&c=d&a=e",
            b"a",
            b"a=",
            b"=b",
            b"=",
            b"a==b",
            b"a=b=c",
            b"sp+ace=x+y%20z",
            b"pct=%41%42%4",
            b"bad=%zz%",
            b"utf8=%C3%A9t%C3%A9&raw=\xc3\xa9",
            b"invalid=\xff\xfe&pct_invalid=%FF",
            b"subject_token=eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_&k=v",
            b"x=%2B&y=%26&z=%3D",
        ];
        for case in cases {
            assert_eq!(
                ours(case),
                crate_pairs(case),
                "{}",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn plain_values_are_borrowed() {
        let body = b"subject_token=a.b.c&role=deploy";
        assert!(
            pairs(body)
                .all(|(k, v)| matches!(k, Cow::Borrowed(_)) && matches!(v, Cow::Borrowed(_)))
        );
        let (_, v) = pairs(b"scope=a+b").next().unwrap();
        assert_eq!(v, "a b");
    }
}
