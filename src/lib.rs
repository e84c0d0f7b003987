//! weir: a fault-tolerant HTTP edge gateway on Pingora.
