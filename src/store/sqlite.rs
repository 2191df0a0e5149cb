//! Embedded SQLite store (written by the store stage).
