//! Record ids as they arrive in paths and bodies.

/// A positive integer that fits `i64`, written in plain decimal digits. Signs, spaces
/// and exponents are refused, so `/users/+1` or `/users/1e3` is not user 1 or 1000.
pub(crate) fn parse_positive(raw: &str) -> Option<i64> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse::<i64>().ok().filter(|&id| id > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_positive_decimal_ids() {
        assert_eq!(parse_positive("1"), Some(1));
        assert_eq!(parse_positive("042"), Some(42));
        assert_eq!(parse_positive("9223372036854775807"), Some(i64::MAX));
    }

    #[test]
    fn refuses_everything_else() {
        for raw in [
            "",
            "0",
            "-1",
            "+1",
            "abc",
            "1.5",
            "1e3",
            " 1",
            "9223372036854775808",
        ] {
            assert_eq!(parse_positive(raw), None, "{raw:?}");
        }
    }
}
