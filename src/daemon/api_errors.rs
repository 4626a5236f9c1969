//! The HTTP status of each domain error the control API's handler returns: the one place
//! where the daemon's own errors meet the API's. The messages are the errors' own; only
//! the status is chosen here. Owns no logic beyond that choice.

use hyper::StatusCode;

use crate::control::ApiError;
use crate::daemon::members::MembershipError;
use crate::group::link::{LinkError, RedeemError};
use crate::net::join::JoinError;
use crate::net::wire::{self, Refusal};

impl From<MembershipError> for ApiError {
    fn from(e: MembershipError) -> ApiError {
        use MembershipError as M;
        let status = match &e {
            M::CheckUses | M::CheckLifetime => StatusCode::BAD_REQUEST,
            M::FindEndpoint
            | M::CreateLinkAsMember { .. }
            | M::JoinOwnLink
            | M::JoinSameGroup { .. }
            | M::JoinAfterRemoval { .. }
            | M::JoinAsMember { .. }
            | M::JoinWhileHosting { .. }
            | M::RemoveAsMember { .. }
            | M::RemoveHost => StatusCode::CONFLICT,
            M::FindMember { .. } => StatusCode::NOT_FOUND,
            M::DecodeLink(LinkError::Expired(_)) => StatusCode::GONE,
            M::DecodeLink(_) => StatusCode::BAD_REQUEST,
            M::Redeem(j) => redeem_status(j),
            M::CheckAdmission(_) | M::VerifyRecords(_) | M::MatchRecords => StatusCode::BAD_GATEWAY,
            M::WaitTunnel => StatusCode::GATEWAY_TIMEOUT,
            M::SaveInvites(_) | M::SaveGroup(_) | M::SetAddress(_) | M::SignRevocation(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e)
    }
}

/// A failed redemption of someone else's link: whose fault it was.
fn redeem_status(e: &JoinError) -> StatusCode {
    match e {
        JoinError::HostUnreachable(_) => StatusCode::BAD_GATEWAY,
        JoinError::Refused(Refusal::Invite(
            RedeemError::AlreadyUsed | RedeemError::Expired | RedeemError::Revoked,
        )) => StatusCode::GONE,
        JoinError::Refused(_) => StatusCode::FORBIDDEN,
        // The link names a host key no proof can be made for: the link is at fault.
        JoinError::BuildMessage(wire::WireError::ProveKeys) => StatusCode::BAD_REQUEST,
        JoinError::CheckName { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::members::MembershipError as M;

    #[test]
    fn membership_errors_keep_the_statuses_and_messages_the_api_always_gave() {
        let cases = [
            (M::CheckUses, StatusCode::BAD_REQUEST),
            (M::FindEndpoint, StatusCode::CONFLICT),
            (M::RemoveHost, StatusCode::CONFLICT),
            (
                M::FindMember {
                    node: "attic".into(),
                },
                StatusCode::NOT_FOUND,
            ),
            (
                M::DecodeLink(LinkError::Expired("yesterday".into())),
                StatusCode::GONE,
            ),
            (
                M::Redeem(JoinError::HostUnreachable("1.2.3.4:5".into())),
                StatusCode::BAD_GATEWAY,
            ),
            (
                M::Redeem(JoinError::Refused(Refusal::Invite(RedeemError::Expired))),
                StatusCode::GONE,
            ),
            (
                M::Redeem(JoinError::Refused(Refusal::KeyProof)),
                StatusCode::FORBIDDEN,
            ),
            (M::MatchRecords, StatusCode::BAD_GATEWAY),
            (M::WaitTunnel, StatusCode::GATEWAY_TIMEOUT),
        ];
        for (e, status) in cases {
            let message = e.to_string();
            let api = ApiError::from(e);
            assert_eq!(api.status, status, "{message}");
            assert_eq!(api.cause.to_string(), message);
        }
        assert_eq!(
            ApiError::from(M::FindMember {
                node: "attic".into()
            })
            .to_string(),
            "no member is called attic; `watchalong peers` lists them"
        );
    }
}
