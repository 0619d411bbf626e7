//! C2SP tlog-tiles hash tiles: `tile/<L>/<N>[.p/<W>]` holds the hashes of the nodes at
//! tree level `8·L` with indexes `256·N … 256·N+W-1` (https://c2sp.org/tlog-tiles).

use super::tree::{Hash, HashStore, LedgerError, stored_hash_index};

/// Hashes per full tile (tile height 8).
pub const TILE_WIDTH: u64 = 256;
const TILE_HEIGHT: u32 = 8;

/// A parsed tile request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileRef {
    pub level: u8,
    pub index: u64,
    /// 1..=256; 256 is a full tile.
    pub width: u64,
}

/// Parses the part of a tile path after `tile/`: `<L>/<N>` or `<L>/<N>.p/<W>`, where `N`
/// is written in zero-padded 3-digit groups, all but the last prefixed with `x`.
pub fn parse_tile_path(path: &str) -> Result<TileRef, LedgerError> {
    let bad = |why: &str| {
        LedgerError::Malformed(format!(
            "tile path '{}': {why}",
            path.chars().take(80).collect::<String>()
        ))
    };
    let (level_text, rest) = path
        .split_once('/')
        .ok_or_else(|| bad("expected <L>/<N>"))?;
    let level: u8 = parse_decimal(level_text)
        .filter(|l| *l <= 7)
        .ok_or_else(|| bad("L must be 0 to 7"))? as u8;
    let (index_text, width) = match rest.split_once(".p/") {
        Some((index, width)) => {
            let width = parse_decimal(width)
                .filter(|w| (1..TILE_WIDTH).contains(w))
                .ok_or_else(|| bad("W must be 1 to 255"))?;
            (index, width)
        }
        None => (rest, TILE_WIDTH),
    };
    let groups: Vec<&str> = index_text.split('/').collect();
    let Some((last, leading)) = groups.split_last() else {
        return Err(bad("missing N"));
    };
    let mut index: u64 = 0;
    for group in leading {
        let digits = group
            .strip_prefix('x')
            .ok_or_else(|| bad("leading N groups start with x"))?;
        index = index
            .checked_mul(1000)
            .and_then(|i| i.checked_add(three_digits(digits)?))
            .ok_or_else(|| bad("N is malformed"))?;
    }
    index = index
        .checked_mul(1000)
        .and_then(|i| i.checked_add(three_digits(last)?))
        .ok_or_else(|| bad("N is malformed"))?;
    Ok(TileRef {
        level,
        index,
        width,
    })
}

/// Formats a tile path (after `tile/`), the inverse of [`parse_tile_path`].
pub fn tile_path(tile: TileRef) -> String {
    let mut groups = Vec::new();
    let mut n = tile.index;
    loop {
        groups.push(n % 1000);
        n /= 1000;
        if n == 0 {
            break;
        }
    }
    let mut parts: Vec<String> = groups.iter().rev().map(|g| format!("x{g:03}")).collect();
    if let Some(last) = parts.last_mut() {
        last.remove(0);
    }
    let mut path = format!("{}/{}", tile.level, parts.join("/"));
    if tile.width < TILE_WIDTH {
        path.push_str(&format!(".p/{}", tile.width));
    }
    path
}

fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty()
        || (text.len() > 1 && text.starts_with('0'))
        || !text.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    text.parse().ok()
}

fn three_digits(text: &str) -> Option<u64> {
    (text.len() == 3 && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

/// The tile's bytes for a tree of `tree_size` records: `width` hashes of 32 bytes.
pub fn tile_data<S: HashStore + ?Sized>(
    store: &S,
    tile: TileRef,
    tree_size: u64,
) -> Result<Vec<u8>, LedgerError> {
    let level = u32::from(tile.level) * TILE_HEIGHT;
    // Nodes at this level that exist in the tree: each covers 2^level records.
    let nodes_at_level = tree_size >> level;
    let end = tile
        .index
        .checked_mul(TILE_WIDTH)
        .and_then(|s| s.checked_add(tile.width));
    if end.is_none_or(|end| end > nodes_at_level) {
        return Err(LedgerError::OutOfRange(format!(
            "tile {} is not in the tree of size {tree_size}",
            tile_path(tile)
        )));
    }
    let start = tile.index * TILE_WIDTH;
    let level = u8::try_from(level).map_err(|_| LedgerError::OutOfRange("tile level".into()))?;
    let indexes: Vec<u64> = (start..start + tile.width)
        .map(|n| stored_hash_index(level, n))
        .collect();
    let hashes: Vec<Hash> = store.read_hashes(&indexes)?;
    Ok(hashes.iter().flat_map(|h| h.0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tree::{MemoryHashStore, root};

    #[test]
    fn paths_round_trip() {
        for (path, tile) in [
            (
                "0/000",
                TileRef {
                    level: 0,
                    index: 0,
                    width: 256,
                },
            ),
            (
                "0/x001/x234/067",
                TileRef {
                    level: 0,
                    index: 1_234_067,
                    width: 256,
                },
            ),
            (
                "1/005.p/7",
                TileRef {
                    level: 1,
                    index: 5,
                    width: 7,
                },
            ),
        ] {
            assert_eq!(parse_tile_path(path).unwrap(), tile, "{path}");
            assert_eq!(tile_path(tile), path);
        }
        for bad in [
            "",
            "0",
            "0/1",
            "0/0001",
            "9/000",
            "0/000.p/0",
            "0/000.p/256",
            "0/001/002",
            "x/000",
            "01/000",
        ] {
            assert!(parse_tile_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn level_zero_tile_holds_the_leaf_hashes_and_level_one_the_subtree_roots() {
        let mut store = MemoryHashStore::new();
        let mut leaves = Vec::new();
        for i in 0..600u32 {
            leaves.push(store.append(&i.to_be_bytes()).unwrap());
        }
        let full = tile_data(
            &store,
            TileRef {
                level: 0,
                index: 1,
                width: 256,
            },
            600,
        )
        .unwrap();
        assert_eq!(full.len(), 256 * 32);
        assert_eq!(&full[..32], &leaves[256].0);
        let partial = tile_data(
            &store,
            TileRef {
                level: 0,
                index: 2,
                width: 88,
            },
            600,
        )
        .unwrap();
        assert_eq!(&partial[87 * 32..], &leaves[599].0);
        assert!(
            tile_data(
                &store,
                TileRef {
                    level: 0,
                    index: 2,
                    width: 89
                },
                600
            )
            .is_err()
        );
        // Level 1 node 1 is the root of records 256..512.
        let level_one = tile_data(
            &store,
            TileRef {
                level: 1,
                index: 0,
                width: 2,
            },
            600,
        )
        .unwrap();
        assert_eq!(&level_one[..32], &root(&store, 256).unwrap().0);
    }
}
