//! Parsing pixel-scale quantities from the command line.
//!
//! `--eps`, `--step-size` and `--lr` are in [0, 1] pixel units, but researchers think in 1/255
//! steps, so both `8/255` and `0.0313725` are accepted.

/// Parses a non-negative finite number written as a decimal (`0.0313`, `1e-3`) or a fraction
/// (`8/255`, `0.5/255`). Rejects empty input, garbage, negative values, NaN, infinities and a zero
/// denominator, with a message suitable for a usage error.
pub fn parse_fraction(s: &str) -> Result<f32, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty value; expected a number such as 8/255 or 0.0314".into());
    }
    let value: f64 = match t.split_once('/') {
        Some((num, den)) => {
            let n = parse_number(num.trim(), s)?;
            let d = parse_number(den.trim(), s)?;
            if d == 0.0 {
                return Err(format!("`{s}`: denominator is zero"));
            }
            n / d
        }
        None => parse_number(t, s)?,
    };
    if !value.is_finite() {
        return Err(format!("`{s}`: value is not finite"));
    }
    if value < 0.0 {
        return Err(format!("`{s}`: value must not be negative"));
    }
    let v = (value as f32).abs(); // turns -0 into 0
    if !v.is_finite() {
        return Err(format!("`{s}`: value is too large"));
    }
    Ok(v)
}

fn parse_number(part: &str, whole: &str) -> Result<f64, String> {
    // Rust's parser accepts "inf", "nan" and "infinity"; only plain numbers are wanted here.
    let plain = !part.is_empty()
        && part
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        && part.chars().any(|c| c.is_ascii_digit());
    let parsed = if plain {
        part.parse::<f64>().ok()
    } else {
        None
    };
    match parsed {
        Some(v) if v.is_finite() => Ok(v),
        _ => Err(format!(
            "`{whole}` is not a number; expected e.g. 8/255, 0.5/255 or 0.0314"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_fraction;

    #[test]
    fn fractions_and_decimals() {
        assert_eq!(parse_fraction("8/255").unwrap(), 8.0 / 255.0);
        assert_eq!(parse_fraction(" 2/255 ").unwrap(), 2.0 / 255.0);
        assert_eq!(parse_fraction("0.5/255").unwrap(), (0.5f64 / 255.0) as f32);
        assert_eq!(parse_fraction("0.0313").unwrap(), 0.0313);
        assert_eq!(parse_fraction("0").unwrap(), 0.0);
        for bad in [
            "", "abc", "8/", "/255", "8/0", "-1", "-8/255", "nan", "NaN", "inf", "1/2/3",
        ] {
            assert!(parse_fraction(bad).is_err(), "{bad:?} accepted");
        }
    }
}
