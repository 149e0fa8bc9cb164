//! The helper's answer to `GetAggregateShare`: the same checks as the leader's collection
//! ([`crate::checks`]), its own count and checksum compared with the leader's, its noisy share
//! sealed to the collector.

use hush_protocol::proto::v1 as pb;
use hush_protocol::{ReportIdChecksum, Role, TaskId};
use prost::Message;

use crate::audit::AuditEvent;
use crate::error::{Error, Result};
use crate::shared::Shared;

use crate::checks::*;

/// The helper's `GetAggregateShare`.
pub async fn helper_share(
    shared: &Shared,
    req: pb::AggregateShareRequest,
) -> Result<pb::AggregateShareResponse> {
    let task_id =
        TaskId::try_from(req.task_id.as_ref()).map_err(|e| Error::InvalidRequest(e.to_string()))?;
    let task = shared.task(&task_id).ok_or(Error::UnknownTask(task_id))?;
    let (interval, windows) = checked_interval(&task, req.interval.as_ref(), shared.clock.now())?;
    let purpose = purpose_of(req.purpose)?;
    let cid: [u8; 16] = req
        .collection_id
        .as_ref()
        .try_into()
        .map_err(|_| Error::InvalidRequest("collection_id must be 16 bytes".into()))?;
    let request_hash = hash(&[&pb::AggregateShareRequest {
        purpose: purpose.to_proto() as i32,
        ..req.clone()
    }
    .encode_to_vec()]);
    let _guard = shared.collect_lock.lock().await;
    if let Some((h, answer)) = shared.store.collection(&task_id, &cid).await? {
        if h != request_hash {
            return Err(Error::JobConflict(format!(
                "collection {} ran with another request",
                hex::encode(cid)
            )));
        }
        return pb::AggregateShareResponse::decode(answer.as_slice())
            .map_err(|e| Error::corrupt("collection answer", e));
    }
    let rule = batch_rule(&task, &interval, purpose);
    check_batch_rules(
        shared,
        &task,
        "leader",
        "aggregate_share",
        &windows,
        &rule,
        purpose,
    )
    .await?;
    let batch = shared
        .store
        .sum_batches(&task_id, &windows, task.config.output_len())
        .await?;
    let leader_checksum = ReportIdChecksum::from(
        <[u8; 32]>::try_from(req.checksum.as_ref())
            .map_err(|_| Error::InvalidRequest("checksum must be 32 bytes".into()))?,
    );
    if batch.report_count != req.report_count || batch.checksum != leader_checksum {
        tracing::error!(
            task = %task_id,
            start = interval.start().as_secs(),
            duration = interval.duration(),
            helper_count = batch.report_count,
            leader_count = req.report_count,
            "the leader and the helper aggregated different reports; refusing the collection"
        );
        shared.collect_refusals.record(
            &shared.trail(),
            AuditEvent {
                actor: "leader".into(),
                action: "aggregate_share".into(),
                tenant: task.config.tenant().into(),
                task: task_id.to_string(),
                outcome: "refused: the aggregators aggregated different reports".into(),
                detail: format!(
                    "helper {} reports, leader {}",
                    batch.report_count, req.report_count
                ),
            },
        );
        shared.store.flush().await?;
        // No counts in the answer: it reaches the collector. Both audit trails have them.
        return Err(Error::Mismatch(
            "the helper and the leader aggregated different reports (report counts or report-id \
             checksums differ; both operators' audit trails and logs have the numbers)"
                .into(),
        ));
    }
    if batch.report_count < task.config.min_batch_size() {
        tracing::info!(task = %task_id, reports = batch.report_count, "refused a collection under min_batch_size");
        return Err(Error::BatchTooSmall {
            count: batch.report_count,
            min: task.config.min_batch_size(),
        });
    }
    let left = check_budget(shared, &task, purpose, &windows).await?;
    let answer = pb::AggregateShareResponse {
        encrypted_aggregate_share: Some(noisy_sealed_share(
            &task,
            Role::Helper,
            &interval,
            &cid,
            &batch,
        )?),
    };
    if let Committed::Before(stored) = commit(
        shared,
        &task,
        &cid,
        purpose,
        &interval,
        &windows,
        &batch,
        request_hash,
        &answer.encode_to_vec(),
    )
    .await?
    {
        // The same request reached another replica first: its share is the one.
        return pb::AggregateShareResponse::decode(stored.as_slice())
            .map_err(|e| Error::corrupt("collection answer", e));
    }
    record_release(
        shared,
        "leader".into(),
        "aggregate_share",
        &task,
        &interval,
        batch.report_count,
        purpose,
        left,
        "aggregate share",
    )
    .await?;
    Ok(answer)
}
