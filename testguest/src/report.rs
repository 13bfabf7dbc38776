//! The serial line format (docs/testguest.md). Every line starts with `TESTGUEST `, then a
//! word saying what it is, then `key=value` pairs:
//!
//! ```text
//! TESTGUEST start tsc_khz=2596000 clock=pit ram_mib=256 mode=normal devices=1
//! TESTGUEST device index=0 base=0xd0000000 irq=5 type=blk id=2 vendor=0x504f4456
//! TESTGUEST blk ...                      (measurements of a test, test-specific keys)
//! TESTGUEST fail test=blk what=...       (one line per failed check)
//! TESTGUEST result test=blk status=pass|fail|skip checks=N failures=M [reason=...]
//! TESTGUEST end status=pass|fail passed=N failed=M
//! ```

use core::fmt;

use crate::println;

/// One test's bookkeeping.
pub struct Test {
    pub name: &'static str,
    checks: u32,
    failures: u32,
}

impl Test {
    pub fn new(name: &'static str) -> Test {
        Test {
            name,
            checks: 0,
            failures: 0,
        }
    }

    /// Records a check; prints a `fail` line if it did not hold.
    pub fn check(&mut self, ok: bool, what: fmt::Arguments) -> bool {
        self.checks += 1;
        if !ok {
            self.failures += 1;
            println!("TESTGUEST fail test={} what={}", self.name, what);
        }
        ok
    }

    pub fn fail(&mut self, what: fmt::Arguments) {
        self.check(false, what);
    }
}

/// The tally over all tests, for the `end` line.
#[derive(Default)]
pub struct Summary {
    pub passed: u32,
    pub failed: u32,
}

impl Summary {
    /// Prints the test's `result` line and counts it.
    pub fn finish(&mut self, t: Test) {
        let pass = t.failures == 0 && t.checks > 0;
        println!(
            "TESTGUEST result test={} status={} checks={} failures={}",
            t.name,
            if pass { "pass" } else { "fail" },
            t.checks,
            t.failures
        );
        if pass {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    /// A requested test that could not run: a failure, said as such.
    pub fn skip(&mut self, name: &str, reason: &str) {
        println!("TESTGUEST result test={name} status=skip checks=0 failures=0 reason={reason}");
        self.failed += 1;
    }

    pub fn end(&self) {
        println!(
            "TESTGUEST end status={} passed={} failed={}",
            if self.failed == 0 { "pass" } else { "fail" },
            self.passed,
            self.failed
        );
    }
}
