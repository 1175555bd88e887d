//! A change of billing rules is a restatement (rule book section 11.2): the
//! store remembers the `[billing]` configuration its bills were computed
//! with; a pipeline opened with other rules marks dirty exactly the
//! account-months whose bills the change may alter, so the next emission
//! recomputes them and emits those that changed (`restated` when final).
//! Nothing is re-priced later, at whatever time a month happens to be
//! recomputed.

use crate::billing::{BillingConfig, Rules};
use crate::store::{Store, StoreError};

/// The meta key of the `[billing]` configuration (JSON) the stored bills
/// were computed with.
pub const RULES_KEY: &str = "billing_rules";

/// What [`mark_changed_months`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RulesChange {
    /// Account-months with an emitted bill whose bill the change may alter,
    /// marked for recomputation.
    pub marked: u64,
    /// Account-months with an emitted bill.
    pub billed: u64,
}

/// Compares `rules` with the configuration the store's bills were computed
/// with. When they differ, marks every account-month with an emitted bill
/// whose month [`Rules::may_bill_differently`] dirty, for the partition of
/// its last bill, and records the new configuration, in one write. A store
/// without a record (new, or written before this was kept) takes the
/// present rules as its own. A time zone change is refused: the stored
/// usage is in the old zone's months and hours.
///
/// Cost: nothing when the rules are unchanged; otherwise one scan of the
/// bill states (about 50 bytes each) and a mark per affected account-month
/// (a price version added for next month marks none).
pub fn mark_changed_months(store: &Store, rules: &Rules) -> Result<RulesChange, StoreError> {
    let now = serde_json::to_vec(&rules.source).expect("the billing configuration serializes");
    let stored = match store.meta(RULES_KEY)? {
        Some(stored) if stored == now => return Ok(RulesChange::default()),
        Some(stored) => stored,
        None => {
            store.put_meta(RULES_KEY, &now)?;
            return Ok(RulesChange::default());
        }
    };
    // Rules that no longer parse or validate (written by another version):
    // every month may differ.
    let old = serde_json::from_slice::<BillingConfig>(&stored).ok().and_then(|c| c.validate().ok());
    if let Some(old) = &old {
        if old.time_zone != rules.time_zone {
            return Err(StoreError::TimeZoneChanged { stored: old.time_zone.clone(), now: rules.time_zone.clone() });
        }
    }
    let mut change = RulesChange::default();
    let mut batch = store.batch();
    for (account, month, state) in store.bill_states()? {
        change.billed += 1;
        if old.as_ref().is_none_or(|old| old.may_bill_differently(rules, month)) {
            batch.mark_dirty(&account, month, state.partition);
            change.marked += 1;
        }
    }
    batch.put_meta(RULES_KEY, &now);
    store.write(batch)?;
    tracing::info!(
        account_months = change.marked,
        of = change.billed,
        "the billing rules changed since the stored bills were computed: the account-months they may change are \
         recomputed at the next emission, and those whose bills change are emitted again (restated when final)"
    );
    Ok(change)
}
