//! A fault-injecting loopback proxy between the daemon and a registry (filled in by the
//! network-fault work).
