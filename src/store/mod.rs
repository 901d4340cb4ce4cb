//! Facade over object stores: key <-> path, metadata, listing.
