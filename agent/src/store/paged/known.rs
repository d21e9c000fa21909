//! The previous set's pages, found by position and by id in bounded memory.
//!
//! A backup compares each page first with the previous set's page at the
//! same position (bbolt leaves an unchanged page where it is), then, when
//! that one differs, looks its id up among all the previous set's pages:
//! after a compaction bbolt writes nodes to pages freed earlier, so a page
//! whose content is stored already may come at another position (the
//! continuation pages of a node larger than a page, moved whole).
//!
//! Neither needs the ids in memory (2 M of them at 8 GiB). The previous
//! index is decoded once into two temporary files (on the scratch volume):
//! its records in page order ([`RECORD_LEN`] bytes each), read on in step
//! with the snapshot, and an open-addressing table of 8-byte slots (the
//! record's number and a tag from its id) sized twice the pages, read at
//! one slot group per lookup. The table is built 2^18 slots at
//! a time (one pass over the records per region, each slot probed within
//! its region), so building it holds one region in memory, never the
//! table: 2 MiB.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;

use super::{decode_index, PagedError, Record, RECORD_LEN};

/// Slots of the id table built at once: 2 MiB of 8-byte slots.
const REGION_SLOTS: usize = 1 << 18;

/// Bytes of one table slot: the record's number plus one (0: empty), then
/// the tag (bytes 8..12 of the id), both little-endian.
const SLOT_LEN: usize = 8;

/// Slots read at once while probing.
const PROBE_SLOTS: usize = 8;

/// Records read at once when building the table.
const BUILD_RECORDS: usize = 7710;

/// The previous set's page records, in temporary files.
pub struct KnownPages {
    records: File,
    table: File,
    /// Slots in the table (a power of two).
    slots: usize,
    /// Slots per region (a power of two dividing `slots`).
    region: usize,
    pages: u64,
    /// The records in page order, read on by [`Self::next_in_order`].
    in_order: BufReader<File>,
    read: u64,
}

impl KnownPages {
    /// Decodes `index` (a downloaded page index of `pages` pages of
    /// `page_size` bytes, its checksum checked) into the two files.
    /// Blocking: run it off the async threads.
    ///
    /// # Errors
    /// The index is damaged; a temporary file cannot be written.
    pub fn build(index: File, page_size: u32, pages: u64, what: &str) -> Result<Self, PagedError> {
        let local = |what: &'static str| move |source| PagedError::Local { what, source };
        let records = tempfile::tempfile().map_err(local(
            "cannot create a temporary file for the previous set's pages",
        ))?;
        let mut out = BufWriter::with_capacity(
            256 << 10,
            records.try_clone().map_err(local(
                "cannot create a temporary file for the previous set's pages",
            ))?,
        );
        let mut encoded = Vec::with_capacity(RECORD_LEN);
        let mut failed = None;
        decode_index(index, page_size, pages, what, |batch| {
            for r in &batch {
                encoded.clear();
                r.encode(&mut encoded);
                if let Err(e) = out.write_all(&encoded) {
                    failed = Some(e);
                    return false;
                }
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(local(
                "cannot write the previous set's pages to a temporary file",
            )(e));
        }
        out.flush().map_err(local(
            "cannot write the previous set's pages to a temporary file",
        ))?;
        drop(out);

        let slots = usize::try_from(pages.saturating_mul(2))
            .unwrap_or(usize::MAX)
            .max(1024)
            .checked_next_power_of_two()
            .ok_or_else(|| PagedError::Damaged {
                what: format!("page index {what}: {pages} pages are more than can be looked up"),
            })?;
        let region = slots.min(REGION_SLOTS);
        let table = tempfile::tempfile().map_err(local(
            "cannot create a temporary file for the previous set's page ids",
        ))?;
        let mut known = Self {
            in_order: BufReader::new(
                records
                    .try_clone()
                    .map_err(local("cannot open the previous set's pages again"))?,
            ),
            records,
            table,
            slots,
            region,
            pages,
            read: 0,
        };
        // Records whose number does not fit a slot are found by position only.
        let indexed = pages.min(u64::from(u32::MAX) - 1);
        let mut buf = vec![0u8; REGION_SLOTS * SLOT_LEN];
        let mut chunk = vec![0u8; BUILD_RECORDS * RECORD_LEN];
        for r in 0..slots / region {
            let slots_here = &mut buf[..region * SLOT_LEN];
            slots_here.fill(0);
            let mut n = 0u64;
            while n < indexed {
                let k = (indexed - n).min(BUILD_RECORDS as u64) as usize;
                let bytes = &mut chunk[..k * RECORD_LEN];
                known
                    .records
                    .read_exact_at(bytes, n * RECORD_LEN as u64)
                    .map_err(local("cannot read the previous set's pages back"))?;
                for (j, rec) in bytes.chunks_exact(RECORD_LEN).enumerate() {
                    let id: &[u8; 16] = rec[..16].try_into().expect("16 bytes");
                    let at = known.home(id);
                    if at / region != r {
                        continue;
                    }
                    known.insert(slots_here, at % region, id, n + j as u64)?;
                }
                n += k as u64;
            }
            known
                .table
                .write_all_at(slots_here, (r * region * SLOT_LEN) as u64)
                .map_err(local(
                    "cannot write the previous set's page ids to a temporary file",
                ))?;
        }
        known
            .in_order
            .rewind()
            .map_err(local("cannot read the previous set's pages back"))?;
        Ok(known)
    }

    /// The previous set's next record in page order; `None` past its last.
    ///
    /// # Errors
    /// The temporary file cannot be read.
    pub fn next_in_order(&mut self) -> Result<Option<Record>, PagedError> {
        if self.read >= self.pages {
            return Ok(None);
        }
        let mut rec = [0u8; RECORD_LEN];
        self.in_order
            .read_exact(&mut rec)
            .map_err(|source| PagedError::Local {
                what: "cannot read the previous set's pages back",
                source,
            })?;
        self.read += 1;
        Ok(Some(Record::decode(&rec)))
    }

    /// A record of the previous set with page id `id`, if it has one.
    ///
    /// # Errors
    /// The temporary files cannot be read.
    pub fn find(&self, id: &[u8; 16]) -> Result<Option<Record>, PagedError> {
        let read = |source| PagedError::Local {
            what: "cannot read the previous set's page ids back",
            source,
        };
        let home = self.home(id);
        let base = home - home % self.region;
        let tag = tag(id);
        let mut group = [0u8; PROBE_SLOTS * SLOT_LEN];
        let mut probed = 0;
        while probed < self.region {
            let at = (home % self.region + probed) % self.region;
            let k = PROBE_SLOTS.min(self.region - at).min(self.region - probed);
            let bytes = &mut group[..k * SLOT_LEN];
            self.table
                .read_exact_at(bytes, ((base + at) * SLOT_LEN) as u64)
                .map_err(read)?;
            for slot in bytes.chunks_exact(SLOT_LEN) {
                let (number, their_tag) = unslot(slot);
                let Some(number) = number else {
                    return Ok(None);
                };
                if their_tag == tag {
                    let r = self.record(number).map_err(read)?;
                    if r.id == *id {
                        return Ok(Some(r));
                    }
                }
            }
            probed += k;
        }
        Ok(None)
    }

    /// The slot an id is looked for first.
    fn home(&self, id: &[u8; 16]) -> usize {
        let h = u64::from_le_bytes(id[..8].try_into().expect("8 bytes"));
        (h as usize) & (self.slots - 1)
    }

    /// Record `number`, read from the records file.
    fn record(&self, number: u64) -> std::io::Result<Record> {
        let mut rec = [0u8; RECORD_LEN];
        self.records
            .read_exact_at(&mut rec, number * RECORD_LEN as u64)?;
        Ok(Record::decode(&rec))
    }

    /// Puts record `number` (page id `id`) in the first free slot of
    /// `region` from `home` on, unless a record with the same id is there
    /// already; a full region (a hostile index) leaves it out.
    fn insert(
        &self,
        region: &mut [u8],
        home: usize,
        id: &[u8; 16],
        number: u64,
    ) -> Result<(), PagedError> {
        let len = region.len() / SLOT_LEN;
        let tag = tag(id);
        for probed in 0..len {
            let at = (home + probed) % len;
            let slot = &mut region[at * SLOT_LEN..(at + 1) * SLOT_LEN];
            match unslot(slot) {
                (None, _) => {
                    let n = u32::try_from(number + 1).expect("numbers past u32 are not indexed");
                    slot[..4].copy_from_slice(&n.to_le_bytes());
                    slot[4..].copy_from_slice(&tag.to_le_bytes());
                    return Ok(());
                }
                (Some(theirs), their_tag) if their_tag == tag => {
                    let r = self.record(theirs).map_err(|source| PagedError::Local {
                        what: "cannot read the previous set's pages back",
                        source,
                    })?;
                    if r.id == *id {
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The tag of a page id kept in its slot: bytes 8..12, which the slot's
/// position does not already say.
fn tag(id: &[u8; 16]) -> u32 {
    u32::from_le_bytes(id[8..12].try_into().expect("4 bytes"))
}

/// A slot's record number (`None`: empty) and tag.
fn unslot(slot: &[u8]) -> (Option<u64>, u32) {
    let n = u32::from_le_bytes(slot[..4].try_into().expect("4 bytes"));
    let tag = u32::from_le_bytes(slot[4..8].try_into().expect("4 bytes"));
    (n.checked_sub(1).map(u64::from), tag)
}

#[cfg(test)]
mod tests {
    use super::super::{IndexEncoder, Location};
    use super::*;

    fn id_of(n: u64) -> [u8; 16] {
        let mut id = [0u8; 16];
        let h = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ n;
        id[..8].copy_from_slice(&h.to_le_bytes());
        id[8..16].copy_from_slice(&(!h).to_le_bytes());
        id
    }

    fn record(n: u64, id: [u8; 16]) -> Record {
        Record {
            id,
            at: Location {
                pack: (n % 7) as u32,
                offset: n * 4096,
                len: 1000 + n as u32,
                slot: (n % 256) as u16,
            },
        }
    }

    /// A page index file of `records`, as a set stores it.
    fn index_file(records: &[Record]) -> File {
        let mut enc = IndexEncoder::new(4096).unwrap();
        let mut bytes = enc.add(records).unwrap();
        bytes.extend(enc.finish().unwrap());
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        f.rewind().unwrap();
        f
    }

    #[test]
    fn every_record_is_found_by_position_and_by_id_and_absent_ids_are_not() {
        // More records than one region's slots hold, so the table has
        // several regions; a run of ids sharing their home slot, and a
        // duplicate id (found at its first record).
        let n = REGION_SLOTS as u64 / 2 + 1000;
        let mut records: Vec<Record> = (0..n).map(|i| record(i, id_of(i))).collect();
        for (k, r) in records.iter_mut().enumerate().skip(10).take(40) {
            r.id[8] = k as u8; // same home slot, different tags and ids
            r.id[..8].copy_from_slice(&7u64.to_le_bytes());
        }
        let dup = records[100].id;
        records[200].id = dup;
        let mut known = KnownPages::build(index_file(&records), 4096, n, "test").unwrap();
        assert!(known.slots / known.region > 1, "{} slots", known.slots);
        for r in &records {
            assert_eq!(known.next_in_order().unwrap(), Some(*r));
        }
        assert_eq!(known.next_in_order().unwrap(), None);
        for (i, r) in records.iter().enumerate() {
            let want = if i == 200 { records[100] } else { *r };
            assert_eq!(known.find(&r.id).unwrap(), Some(want), "record {i}");
        }
        for i in n..n + 5000 {
            assert_eq!(known.find(&id_of(i)).unwrap(), None, "id {i}");
        }
        // An id whose home slot and tag match a stored one, but not the rest.
        let mut near = records[15].id;
        near[15] ^= 1;
        assert_eq!(known.find(&near).unwrap(), None);
    }

    #[test]
    fn a_damaged_index_is_refused_with_its_name() {
        let records: Vec<Record> = (0..10).map(|i| record(i, id_of(i))).collect();
        let Err(e) = KnownPages::build(index_file(&records), 4096, 11, "c/n/ts/pages.idx") else {
            panic!("an index one record short was accepted");
        };
        let text = e.to_string();
        assert!(
            text.contains("c/n/ts/pages.idx") && text.contains("ends after 10"),
            "{text}"
        );
    }
}
