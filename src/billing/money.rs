//! Exact money arithmetic: a charge line is `quantity / unit_size x
//! unit_price`, rounded to 2 decimal places half away from zero, computed in
//! integers so no intermediate value is ever rounded.

use rust_decimal::Decimal;

/// Calls are priced per 10,000.
pub const CALLS_UNIT_SIZE: u64 = 10_000;
/// Traffic is priced per GB = 2^30 bytes.
pub const GB: u64 = 1 << 30;
/// Largest unit price accepted by configuration validation.
pub const MAX_UNIT_PRICE: i64 = 1_000_000;
/// Most decimal places a unit price may have.
pub const MAX_PRICE_SCALE: u32 = 10;

/// `quantity / unit_size x unit_price`, rounded to cents half away from zero.
///
/// Precondition (enforced by config validation): `0 <= unit_price <=
/// MAX_UNIT_PRICE` with at most `MAX_PRICE_SCALE` decimal places, and
/// `unit_size > 0`. Under it, every intermediate fits an `i128`:
/// `2 x quantity x mantissa x 100 < 2^64 x 2^54 x 2^8 = 2^126`.
pub fn line_amount(quantity: u64, unit_price: Decimal, unit_size: u64) -> Decimal {
    discounted_line_amount(quantity, unit_price, unit_size, Decimal::ZERO)
}

/// `quantity / unit_size x unit_price x (1 - discount)`, rounded once to
/// cents half away from zero (rule book section 11.3: the discount applies
/// to the exact product, and the line is rounded once).
///
/// Preconditions as [`line_amount`], and `0 <= discount < 1` with at most
/// [`crate::billing::account::MAX_DISCOUNT_SCALE`] places (checked when
/// the account record is decoded). With `a = quantity x mantissa x 100`,
/// `b = 10^ds - discount mantissa` and `d` the divisor, the cents are
/// `floor((2ab + d) / 2d)`; `ab` may pass 2^127, so it is split as
/// `a = qd + r`: the cents are `qb + floor((2rb + d) / 2d)`, every term
/// below 2^110.
pub fn discounted_line_amount(quantity: u64, unit_price: Decimal, unit_size: u64, discount: Decimal) -> Decimal {
    let (a, b, d) = discounted_parts(quantity, unit_price, unit_size, discount, 100);
    let (q, r) = (a / d, a % d);
    let cents = q * b + (2 * r * b + d) / (2 * d);
    Decimal::from_i128_with_scale(cents, 2)
}

/// `(quantity x mantissa x times, 10^ds - discount mantissa, 10^scale x
/// 10^ds x unit_size)`: the line is `a x b / d / times`.
fn discounted_parts(quantity: u64, unit_price: Decimal, unit_size: u64, discount: Decimal, times: i128) -> (i128, i128, i128) {
    assert!(unit_size > 0, "unit_size is positive");
    let mantissa = unit_price.mantissa();
    let scale = unit_price.scale();
    assert!(mantissa >= 0 && scale <= MAX_PRICE_SCALE, "unit price validated by configuration");
    let (dm, ds) = (discount.mantissa(), discount.scale());
    let keep = 10i128.pow(ds);
    assert!((0..keep).contains(&dm) && ds <= 6, "discount validated when decoded");
    (i128::from(quantity) * mantissa * times, keep - dm, 10i128.pow(scale) * keep * i128::from(unit_size))
}

/// `quantity / unit_size x unit_price` exactly, as a decimal string with
/// every digit (the expansion ends: the divisor is `10^scale x unit_size`,
/// and unit sizes are 10,000 and 2^30), before [`line_amount`] rounds it.
pub fn exact_amount(quantity: u64, unit_price: Decimal, unit_size: u64) -> String {
    exact_discounted_amount(quantity, unit_price, unit_size, Decimal::ZERO)
}

/// `quantity / unit_size x unit_price x (1 - discount)` exactly, every
/// digit, before [`discounted_line_amount`] rounds it.
pub fn exact_discounted_amount(quantity: u64, unit_price: Decimal, unit_size: u64, discount: Decimal) -> String {
    let (a, b, den) = discounted_parts(quantity, unit_price, unit_size, discount, 1);
    let (q, r) = (a / den, a % den);
    let mut out = (q * b + r * b / den).to_string();
    let mut rem = r * b % den;
    if rem != 0 {
        out.push('.');
        // At most 64 digits: enough for any divisor of the form 2^a 5^b
        // that configuration allows; a longer expansion is cut, marked "...".
        for _ in 0..64 {
            if rem == 0 {
                break;
            }
            rem *= 10;
            out.push(char::from(b'0' + (rem / den) as u8));
            rem %= den;
        }
        if rem != 0 {
            out.push_str("...");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn rounds_half_away_from_zero() {
        // 125 calls at 0.04 per 100 = 0.05 exactly; 1.25 calls-units x 0.01 = 0.0125 -> 0.01
        assert_eq!(line_amount(12_500, dec!(0.01), 10_000), dec!(0.01));
        // 0.005 exactly rounds up to 0.01.
        assert_eq!(line_amount(5_000, dec!(0.01), 10_000), dec!(0.01));
        assert_eq!(line_amount(4_999, dec!(0.01), 10_000), dec!(0.00));
    }

    #[test]
    fn exact_amounts_have_every_digit() {
        assert_eq!(exact_amount(12_500, dec!(0.01), 10_000), "0.0125");
        assert_eq!(exact_amount(600_000, dec!(0.06), 10_000), "3.6");
        assert_eq!(exact_amount(0, dec!(0.80), GB), "0");
        // 15% off 3.6: 3.06 exactly; off 0.0125: 0.010625, rounded once to 0.01.
        assert_eq!(exact_discounted_amount(600_000, dec!(0.06), 10_000, dec!(0.15)), "3.06");
        assert_eq!(exact_discounted_amount(12_500, dec!(0.01), 10_000, dec!(0.15)), "0.010625");
        assert_eq!(discounted_line_amount(12_500, dec!(0.01), 10_000, dec!(0.15)), dec!(0.01));
        // 1 byte at 0.80 per GB: 0.8 / 2^30, 32 decimal places.
        assert_eq!(exact_amount(1, dec!(0.80), GB), "0.0000000007450580596923828125");
        assert_eq!(exact_amount(2_684_354_560, dec!(0.80), GB), "2");
    }

    #[test]
    fn traffic_in_gb_is_exact() {
        // 2.5 GB at 0.80 = 2.00
        assert_eq!(line_amount(2_684_354_560, dec!(0.80), GB), dec!(2.00));
        // 1 byte at the largest price is still exact: 1/2^30 x 1e6 = 0.000931... -> 0.00
        assert_eq!(line_amount(1, dec!(1000000), GB), dec!(0.00));
        assert_eq!(
            line_amount(u64::MAX, dec!(1000000.0000000001), 1),
            Decimal::from_i128_with_scale((i128::from(u64::MAX) * 10_000_000_000_000_001 * 100 + 5_000_000_000) / 10_000_000_000, 2)
        );
    }
}
