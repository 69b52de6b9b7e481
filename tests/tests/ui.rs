//! Compile-time checks of `#[idempotent]`: each file in `ui/fail` must fail with exactly
//! the checked-in `.stderr`; each in `ui/pass` must compile.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("ui/pass/*.rs");
    t.compile_fail("ui/fail/*.rs");
}
