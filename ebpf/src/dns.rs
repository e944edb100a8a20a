//! DNS cache hits answered in the kernel (being written).
