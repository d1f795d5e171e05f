//! Images, manifests, input listing and output writing.
