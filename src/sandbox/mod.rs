//! Sandbox runner.
